"""The bounds on a multipart body's shape: parts per body and bytes per part header, in the
parser and at the front door's limits (413 and 400 with what to change), then a real server
that keeps serving after such bodies."""

from __future__ import annotations

import httpx
import pytest

from sota_serve.errors import MalformedRequestError
from sota_serve.http.limits import MAX_OPTION_FIELDS, Limits, Rejected
from sota_serve.http.multipart import MAX_PART_HEADER_BYTES, TooManyPartsError, boundary, parts

SEP = b"b0undary"
CONTENT_TYPE = "multipart/form-data; boundary=b0undary"


def _body(fields: int, *, header_padding: int = 0, files: int = 1) -> bytes:
    out = []
    for i in range(files):
        out.append(b"--" + SEP + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                   + b"X-Pad: " + b"p" * header_padding + b"\r\n\r\n" + b"png" + str(i).encode() + b"\r\n")
    for i in range(fields):
        out.append(b"--" + SEP + b'\r\nContent-Disposition: form-data; name="f' + str(i).encode()
                   + b'"\r\n\r\nv\r\n')
    return b"".join(out) + b"--" + SEP + b"--\r\n"


def test_parts_up_to_the_bound_are_read_and_one_more_is_413():
    assert len(list(parts(_body(9), SEP, max_parts=10))) == 10
    with pytest.raises(TooManyPartsError, match="more than 10 parts") as e:
        list(parts(_body(10), SEP, max_parts=10))
    assert e.value.http_status == 413


def test_a_part_header_past_the_bound_is_400_without_scanning_the_body_for_its_end():
    assert len(list(parts(_body(0, header_padding=MAX_PART_HEADER_BYTES - 100), SEP))) == 1
    with pytest.raises(MalformedRequestError, match="header is longer than") as e:
        list(parts(_body(0, header_padding=MAX_PART_HEADER_BYTES + 1), SEP))
    assert e.value.http_status == 400


def test_the_front_doors_form_allows_its_files_and_the_option_fields_and_no_more():
    limits = Limits(max_body_bytes=10**7, body_timeout_s=5, max_files=4)
    assert len(limits.form(CONTENT_TYPE, _body(MAX_OPTION_FIELDS, files=4), "image")) == 4 + MAX_OPTION_FIELDS
    with pytest.raises(Rejected) as e:
        limits.form(CONTENT_TYPE, _body(MAX_OPTION_FIELDS + 1, files=4), "image")
    assert e.value.status == 413 and "parts" in e.value.message
    assert boundary(CONTENT_TYPE) == SEP


@pytest.mark.slow
def test_a_server_answers_bodies_of_many_parts_or_long_headers_and_keeps_serving(server, photos):
    url = f"{server.url}/classify"
    many = httpx.post(url, content=_body(100_000), headers={"content-type": CONTENT_TYPE})
    assert many.status_code == 413 and "parts" in many.json()["error"]
    long_header = httpx.post(url, content=_body(0, header_padding=10**6), headers={"content-type": CONTENT_TYPE})
    assert long_header.status_code == 400 and "header" in long_header.json()["error"]
    ok = httpx.post(url, files={"image": (photos[0].name, photos[0].read_bytes())})
    assert ok.status_code == 200 and ok.json()["predictions"]
