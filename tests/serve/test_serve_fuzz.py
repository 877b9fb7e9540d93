"""Any request body, any data: URL: a checked Query or one of the serve layer's 4xx errors, never a crash."""
from __future__ import annotations

import base64
import io

from hypothesis import given, settings, strategies as st
from PIL import Image

from emloc_edge.errors import BadInputError
from emloc_edge.serve.config import ServeConfig
from emloc_edge.serve.errors import api_error
from emloc_edge.serve.images import decode_data_url
from emloc_edge.serve.protocol import Query, parse_request

CONFIG = ServeConfig("model", "memories", max_tokens=16, max_image_pixels=64 * 64)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio"])},
                             optional={"text": JSON, "image_url": st.fixed_dictionaries({"url": st.text(max_size=30)})})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3])},
                                optional={"content": st.one_of(st.text(max_size=10), st.lists(PART, max_size=3), JSON)})
BODY = st.fixed_dictionaries({}, optional={"model": JSON | st.text(max_size=8), "messages": st.lists(MESSAGE, max_size=3) | JSON,
                                           "max_tokens": JSON | st.integers(-3, 40), "stream": JSON})


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.one_of(BODY, JSON))
def test_any_body_is_a_query_or_a_4xx(data):
    try:
        query = parse_request(data, CONFIG, "rid")
    except BadInputError as e:
        err = api_error(e)
        assert 400 <= err.status < 500 and err.message and "\n" not in err.message
        return
    assert isinstance(query, Query) and 1 <= query.max_tokens <= CONFIG.max_tokens
    assert query.image is not None or query.question


@settings(max_examples=200, deadline=None)
@given(media=st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "image/svg+xml"]),
       payload=st.one_of(st.binary(max_size=64), st.just(_png(8, 8)), st.just(_png(65, 64)),
                         st.binary(max_size=64).map(lambda b: _png(4, 4)[: len(b) % 60])),
       encode=st.booleans(), base64_flag=st.booleans())
def test_any_data_url_is_an_image_or_a_4xx(media, payload, encode, base64_flag):
    data = base64.b64encode(payload).decode() if encode else payload.decode("latin-1")
    url = f"data:{media}{';base64' if base64_flag else ''},{data}"
    try:
        image = decode_data_url(url, CONFIG.max_image_pixels)
    except BadInputError as e:
        assert api_error(e).status in (400, 413, 415)
        return
    assert image.mode == "RGB" and image.width * image.height <= CONFIG.max_image_pixels
