"""`kvcli serve` scaled out on Ray Serve: model replicas routed by document, one shared disk tier.

When one server is not enough, the distributing is Ray Serve's (deployments, handles, its
HTTP proxy, replica health and restarts), not ours. kvcli adds two things:

  - DocumentKeyRouter, a Ray Serve request router: a request goes to the replica that owns
    its document on a consistent-hash ring of the live replicas, so a document's cache is
    made and kept warm in one place. A replica that dies (or is added) moves only the
    documents it owned (or takes over), never the others';
  - Replica, one kvcli ModelService (model, cache manager, tiers: kvcli.serve.service) per
    Ray actor, on a GPU or CPU worker. Its disk tier is the kvcli store under a common
    `cache_dir` (a shared file system on a cluster): files are written atomically
    (kvcli.store.kvcfile), named by content (model, document, configuration), and a replica
    meeting a document for the first time looks there before reading it, so any replica
    loads a cache any other one saved (after a failure, say).

Ingress (the HTTP entry) forwards POST /ask and POST /compress to the replicas by document
key and retries on another replica when the one it chose dies mid-request (an answer
decodes over a copy of the cache, so asking again changes nothing stored).

    serve run kvcli.serve.replicas:app replicas=4 device=cuda cache_dir=/shared/kvcli gpus_per_replica=1

What stays single-machine: each replica's memory tiers (GPU, CPU), its queue and its
placement decisions (one CacheManager per replica; nothing is coordinated across them
but the routing), and the documents' paths, which the replica reads (give text, or paths
every worker can read). Ray is an optional extra: `pip install 'kvcli[ray]'`.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Callable

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvcli.errors import KvcliError
from kvcli.serve.routing import HashRing, document_key

RETRIES = 8  # attempts of one request while replicas die and Ray Serve replaces them
RETRY_SECONDS = 0.5  # first pause between attempts (doubling, at most 4 s)


class DocumentKeyRouter(RequestRouter):
    """Ray Serve request router: a call whose first argument is a document key goes to the
    key's owner on the ring of live replicas (only there: its cache is there); other calls
    go to any replica."""

    def initialize_state(self, **kwargs):
        self.ring: HashRing | None = None
        self.ring_members: frozenset[str] = frozenset()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(key, str) or not candidate_replicas:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        if self.ring is None or self.ring_members != by_id.keys():  # a replica died or joined: rebuild
            self.ring, self.ring_members = HashRing(list(by_id)), frozenset(by_id)
        return [[by_id[self.ring.owner(key)]]]


class Replica:
    """One kvcli model service in a Ray actor, its disk tier in the shared store."""

    def __init__(self, model: str | Callable = "default", *, device: str = "auto", cache_dir: str | None = None,
                 capacities: dict | None = None, policy: str = "joint", max_pending: int = 8):
        """`model`: a model spec (as `kvcli serve --model`) or a function returning a LoadedModel;
        `cache_dir`: kvcli's cache folder shared by every replica (its store is the disk tier)."""
        if cache_dir is not None:
            os.environ["KVCLI_CACHE_DIR"] = cache_dir  # this actor's process only
        from kvcli.models import load_model
        from kvcli.serve.manager import make_manager
        from kvcli.serve.service import ModelService
        from kvcli.serve.tiers import machine_tiers
        from kvcli.store.persist import store_dir

        loaded = model() if callable(model) else load_model(model, device=device)
        manager = make_manager(policy, machine_tiers(store_dir(), capacities or {}), ModelService.shape_of(loaded))
        self.service = ModelService(loaded, manager, max_pending=max_pending, profile=policy != "lru", shared_store=True)
        self.name = serve.get_replica_context().replica_id.unique_id

    async def ask(self, key: str, body: dict) -> dict:
        """POST /ask's reply (not streamed), with the replica that answered; errors as {"error", "status"}."""
        from kvcli.serve.requests import ask_request

        return await asyncio.to_thread(
            self._model_job, lambda: ask_request({**body, "stream": False}), lambda request, document: self.service.ask(request, document, None)
        )

    async def compress(self, key: str, body: dict) -> dict:
        from kvcli.serve.requests import compress_request

        return await asyncio.to_thread(self._model_job, lambda: compress_request(body), self.service.compress)

    def caches(self) -> dict:
        return {"replica": self.name, "caches": self.service.manager.listing()}

    def _model_job(self, parse, work) -> dict:
        """As the HTTP server runs a request: the body checked and the document read before the
        model's turn, the reply returned before profiling and placement settle (in that turn)."""
        from kvcli.serve.service import Busy

        service = self.service
        try:
            request = parse()
            document = service.read_document(request.source)
            service.reserve()
        except Busy as exc:
            return {"error": str(exc), "status": 503}
        except KvcliError as exc:
            return {"error": str(exc), "status": 400}
        service.lock.acquire()
        try:
            result = work(request, document)
        except KvcliError as exc:
            result = {"error": str(exc), "status": 400}
        except BaseException:
            self._settle()
            raise
        threading.Thread(target=self._settle, daemon=True).start()
        return {**result, "replica": self.name, "pid": os.getpid()}

    def _settle(self) -> None:
        """Profile and place after a reply, then give the model and the queue place back."""
        try:
            self.service.after_request()
        except Exception as exc:  # the reply is out: keep the failure for the operator
            self.service.warn(f"settling placement failed: {type(exc).__name__}: {exc}")
        finally:
            self.service.lock.release()
            self.service.release()


class Ingress:
    """The HTTP entry: POST /ask and /compress (kvcli.serve.server's bodies, JSON replies),
    routed by document key, retried on another replica when one dies."""

    def __init__(self, replicas, token: str | None = None):
        self.replicas, self.token = replicas, token

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self.token is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {self.token}".encode()):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method != "POST" or path not in ("ask", "compress"):
            return JSONResponse({"error": f"no such endpoint: {request.method} {request.url.path[:200]}"}, status_code=404)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
            result = await self.call(path, body)
        except (ValueError, TypeError, KvcliError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if "error" in result:
            return JSONResponse({"error": result["error"]}, status_code=result.get("status", 500))
        return JSONResponse({**result, "done": True} if path == "ask" else result)

    async def ask(self, body: dict) -> dict:
        return await self.call("ask", body)

    async def compress(self, body: dict) -> dict:
        return await self.call("compress", body)

    async def call(self, method: str, body: dict) -> dict:
        key = document_key(body)
        pause = RETRY_SECONDS
        for attempt in range(RETRIES):
            try:
                return await getattr(self.replicas, method).remote(key, body)
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(pause)  # Ray Serve drops the dead replica from the ring meanwhile
                pause = min(4.0, 2 * pause)
        raise AssertionError("unreachable")


def build(*, replicas: int = 2, model: str | Callable = "default", device: str = "auto", cache_dir: str | None = None,
          capacities: dict | None = None, policy: str = "joint", cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
          token: str | None = None):
    """The Ray Serve application: `replicas` Replica actors behind DocumentKeyRouter, and the Ingress."""
    replica = serve.deployment(
        Replica, num_replicas=replicas, max_ongoing_requests=64,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class=DocumentKeyRouter),
    ).bind(model, device=device, cache_dir=cache_dir, capacities=capacities, policy=policy)
    return serve.deployment(Ingress, ray_actor_options={"num_cpus": 0}).bind(replica, token=token)


def app(args: dict):
    """`serve run kvcli.serve.replicas:app replicas=N device=cuda cache_dir=DIR ...` (values as
    text). Clients must send $KVCLI_SERVER_TOKEN of the process that starts it (required: the
    replicas read files as their user, so the HTTP entry is never open)."""
    from kvcli.serve.token import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise KvcliError(f"set {TOKEN_ENV} to a secret before starting the replicas; clients send it too")
    numbers = {"replicas": int, "cpus_per_replica": float, "gpus_per_replica": float}
    unknown = set(args) - {*numbers, "model", "device", "cache_dir", "policy", "gpu_bytes", "cpu_bytes", "disk_bytes"}
    if unknown:
        raise KvcliError(f"unknown option(s) {', '.join(sorted(unknown))}")
    options = {k: numbers.get(k, str)(v) for k, v in args.items() if not k.endswith("_bytes")}
    capacities = {tier: int(args[f"{tier}_bytes"]) for tier in ("gpu", "cpu", "disk") if f"{tier}_bytes" in args}
    return build(**options, capacities=capacities or None, token=token)
