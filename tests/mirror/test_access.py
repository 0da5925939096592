"""Gated and private repos through the team mirror: what came through a token never reaches anyone
the upstream would refuse, however the requests interleave and whether or not the upstream answers.

The upstream is `hfmirror serve` with a ``require_token`` fault: ``gated/model`` is private (its
listing and its files need the token) or gated (only its files do), as the tests set it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import requests

from hfmirror.server import mirror as mirror_module
from hfmirror.server.app import ServerThread, create_app
from tests.mirror.conftest import Mirror, Upstream
from tests.mirror.support import MIB, wait_until

GOOD = {"Authorization": "Bearer hf_good"}
LISTING = "/api/models/gated/model"


def assert_refused(response: requests.Response, *statuses: int) -> None:
    """An error answer in the Hub's form, and nothing else: the body is the error's JSON alone."""
    assert response.status_code in statuses, (response.status_code, response.text[:200])
    assert response.json() == {"error": response.headers["X-Error-Message"]}


@pytest.mark.parametrize("upstream_timeout", [1.0, 10.0])
def test_a_listing_fetched_with_a_token_is_classified_before_anyone_else_sees_it(
    upstream: Upstream, mirror: Callable[..., Mirror], upstream_timeout: float
) -> None:
    # A private repo; the mirror's anonymous check of it (one HEAD) is slow, so its answer comes
    # after the tokened listing (and, with a 1 s timeout, after the tokened client gave up waiting).
    upstream.plan.require_token("hf_good", path="*/gated/model/*")
    upstream.plan.stall(4, methods=("HEAD",), path="/gated/model/resolve/*", times=1)
    m = mirror(upstream.url, upstream_timeout=upstream_timeout)
    tokened: dict[str, requests.Response] = {}
    client = threading.Thread(
        target=lambda: tokened.update(r=requests.get(m.url + LISTING, headers=GOOD, timeout=60))
    )
    client.start()
    wait_until(lambda: upstream.plan.requests("/gated/model/resolve/*", method="HEAD"), timeout=30)
    # The check is under way: the listing the token fetched must not be anyone else's yet. The
    # anonymous request waits for the same upstream call: refused once the check is done (401), or
    # at its own timeout before that (504).
    assert_refused(requests.get(m.url + LISTING, timeout=60), 401 if upstream_timeout > 4 else 504)
    client.join(60)
    assert not client.is_alive()
    if upstream_timeout > 4:
        assert tokened["r"].status_code == 200 and tokened["r"].json()["siblings"]
    else:
        assert_refused(tokened["r"], 504)  # gave up waiting; the check went on
    marker = m.root / "models--gated--model" / ".hfmirror" / "restricted"
    wait_until(marker.exists, timeout=30)
    assert_refused(requests.get(m.url + LISTING, timeout=60), 401)
    assert requests.get(m.url + LISTING, headers=GOOD, timeout=60).status_code == 200


def test_a_request_that_joined_another_tokens_refused_listing_asks_with_its_own(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    upstream.plan.require_token("hf_good", path="*/gated/model/*")
    upstream.plan.stall(3, path="/api/models/gated/model/*", times=1)  # the anonymous listing, slowly
    m = mirror(upstream.url)
    anonymous: dict[str, requests.Response] = {}
    client = threading.Thread(target=lambda: anonymous.update(r=requests.get(m.url + LISTING, timeout=60)))
    client.start()
    wait_until(lambda: upstream.plan.requests("/api/models/gated/model/*"), timeout=30)
    tokened = requests.get(m.url + LISTING, headers=GOOD, timeout=60)  # joins the anonymous call
    client.join(60)
    assert_refused(anonymous["r"], 403)  # the upstream said GatedRepo
    assert tokened.status_code == 200 and tokened.json()["id"] == "gated/model"
    listings = upstream.plan.requests("/api/models/gated/model/*")
    assert [r.headers.get("authorization") for r in listings] == [None, "Bearer hf_good"]


@pytest.mark.parametrize("until", ["filling", "cached"])
def test_a_request_without_a_token_never_gets_what_a_token_fetched_meanwhile(
    upstream: Upstream, mirror: Callable[..., Mirror], monkeypatch: pytest.MonkeyPatch, until: str
) -> None:
    # A gated repo: anyone may list it, only the token may read its files.
    upstream.plan.require_token("hf_good", path="/gated/model/resolve/*")
    weights = (upstream.root / "gated/model/model.safetensors").read_bytes()
    if until == "filling":  # the fill certainly runs while the anonymous request goes on
        upstream.plan.stall(3, after_bytes=MIB, methods=("GET",), path="/gated/model/resolve/*", times=1)
    m = mirror(upstream.url)
    assert requests.get(m.url + LISTING, timeout=30).status_code == 200
    # Hold the anonymous request between its access check (nothing known to be restricted yet) and
    # the moment it joins a fill or reads the cache, until the tokened request has classified the repo
    # and started a fill (or finished it): the window a busy thread pool opens.
    blob = m.root / "models--gated--model" / "blobs" / hashlib.sha256(weights).hexdigest()
    is_complete, held, fills = mirror_module._is_complete, threading.Event(), m.app.state.fills
    ready = {"filling": lambda: fills.running() > 0, "cached": blob.exists}[until]

    def slow_for_the_first(layout, file):  # type: ignore[no-untyped-def]
        if not held.is_set():
            held.set()
            wait_until(ready, timeout=30)
        return is_complete(layout, file)

    monkeypatch.setattr(mirror_module, "_is_complete", slow_for_the_first)
    url = m.url + "/gated/model/resolve/main/model.safetensors"
    anonymous: dict[str, requests.Response] = {}
    client = threading.Thread(target=lambda: anonymous.update(r=requests.get(url, timeout=60)))
    client.start()
    held.wait(30)
    tokened = requests.get(url, headers=GOOD, timeout=60)
    client.join(60)
    assert tokened.content == weights
    assert_refused(anonymous["r"], 401)


def seed_with_huggingface_hub(upstream: Upstream, cache: Path) -> bytes:
    """``gated/model`` put into ``cache`` by huggingface_hub with the token, as an operator might seed
    the mirror's ROOT from an existing cache; the weights' bytes."""
    path = huggingface_hub.hf_hub_download(
        "gated/model", "model.safetensors", endpoint=upstream.url, cache_dir=cache, token="hf_good"
    )
    return Path(path).read_bytes()


def test_content_seeded_by_another_tool_is_classified_before_it_is_served(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    upstream.plan.require_token("hf_good", path="/gated/model/resolve/*")  # gated: files need the token
    weights = seed_with_huggingface_hub(upstream, tmp_path / "cache")
    m = mirror(upstream.url, root=tmp_path / "cache")
    url = m.url + "/gated/model/resolve/main/model.safetensors"
    assert_refused(requests.get(url, timeout=30), 401)
    assert requests.get(url, headers=GOOD, timeout=30).content == weights


def test_with_the_upstream_down_content_the_mirror_did_not_list_is_refused_unless_the_operator_says(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path, unused_port: int
) -> None:
    upstream.plan.require_token("hf_good", path="/gated/model/resolve/*")
    weights = seed_with_huggingface_hub(upstream, tmp_path / "cache")
    dead = f"http://127.0.0.1:{unused_port}"
    refusing = mirror(dead, root=tmp_path / "cache", upstream_timeout=3)
    for route in ("/gated/model/resolve/main/model.safetensors", LISTING):
        r = requests.get(refusing.url + route, timeout=60)
        assert_refused(r, 504)
        assert "--serve-seeded-offline" in r.headers["X-Error-Message"]
    trusting = mirror(dead, root=tmp_path / "cache", upstream_timeout=3, serve_seeded_offline=True)
    served = requests.get(trusting.url + "/gated/model/resolve/main/model.safetensors", timeout=60)
    assert served.status_code == 200 and served.content == weights


def test_plain_serve_of_a_mirrors_cache_withholds_what_came_through_a_token(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    # The mirror fetched a gated repo's weights with a token; then someone serves the same ROOT
    # without --upstream, which cannot ask the upstream who may read them.
    upstream.plan.require_token("hf_good", path="/gated/model/resolve/*")
    m = mirror(upstream.url)
    route = "/gated/model/resolve/main/model.safetensors"
    weights = requests.get(m.url + route, headers=GOOD, timeout=60).content
    assert weights == (upstream.root / "gated/model/model.safetensors").read_bytes()
    assert (m.root / "models--gated--model" / ".hfmirror" / "restricted").exists()
    requests.get(m.url + "/tiny/bert/resolve/main/config.json", timeout=60).raise_for_status()
    plain = create_app(m.root, state_dir=tmp_path / "plain-state")
    try:
        with ServerThread(plain) as server:
            for path in (route, LISTING):
                for headers in ({}, GOOD):
                    assert_refused(requests.get(server.url + path, headers=headers, timeout=30), 401)
            config = requests.get(server.url + "/tiny/bert/resolve/main/config.json", timeout=30)
            assert config.status_code == 200  # public repos of the same ROOT are served as ever
        assert [r.repo_id for r in plain.state.store.discover()] == ["tiny/bert"]
    finally:
        plain.state.checksums.close()
