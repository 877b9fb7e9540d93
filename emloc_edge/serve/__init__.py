"""`emloc-edge serve`: one exported model, many task memories, chosen per request over an OpenAI-compatible
HTTP API (FastAPI on uvicorn), in one process (server.py) or scaled out on Ray Serve (ray_app.py).

    client ─HTTP─► app.py (routes, errors, auth, limits) ─► Backend ─► EdgeModel.bind(memory) ─► tokens
                                                           local.py: this process's EdgeModel, threads
                                                           ray_app.py: replicas multiplexed by memory name

Needs the [serve] extra; never imports torch. Nothing is imported here so `emloc_edge.serve.x` stays cheap.
"""
