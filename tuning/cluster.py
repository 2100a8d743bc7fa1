"""Preflight checks on a Ray cluster, run before any trial starts.

Since Ray 2.7 there is no head-node syncing: every node must see the same storage path, and
every node must reach the tracking store. For each alive node, a task pinned to that node reads
a probe file the driver wrote under the storage path, writes its own reply next to it, and (for
an http tracking URI) asks the server's ``/health``. A sqlite store is refused as soon as more
than one node is alive: workers on other nodes cannot open it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from trainables.errors import HesstuneError

__all__ = ["PreflightError", "alive_nodes", "preflight"]


class PreflightError(HesstuneError):
    """The cluster cannot run this sweep as configured; the message names the node and the fix."""


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _probe(folder: str, token: str, tracking_uri: str) -> dict[str, str]:
    """Runs on one node: read the driver's probe, write a reply, check the tracking server."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = {"node": node, "storage": "ok", "tracking": "ok"}
    try:
        if (Path(folder) / f"{token}.driver").read_text() != token:
            out["storage"] = "probe content differs"
        (Path(folder) / f"{token}.{node}").write_text(node)
    except OSError as exc:
        out["storage"] = str(exc)
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as resp:
                out["tracking"] = "ok" if resp.status == 200 else f"HTTP {resp.status}"
        except OSError as exc:
            out["tracking"] = str(exc)
    return out


def preflight(storage: Path, tracking_uri: str, *, timeout: float = 120.0) -> int:
    """Check storage and tracking from every alive node; returns the number of nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) > 1 and tracking_uri.startswith("sqlite"):
        raise PreflightError(
            f"the cluster has {len(nodes)} nodes but the tracking URI is a local sqlite file: "
            "start `hesstune server --host 0.0.0.0` on the head and pass --tracking-uri http://HEAD:5000"
        )
    folder = storage / ".preflight"
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (folder / f"{token}.driver").write_text(token)
    task = ray.remote(num_cpus=0)(_probe)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(folder), token, tracking_uri
        )
        for n in nodes
    ]
    try:
        replies = ray.get(refs, timeout=timeout)
        seen = {reply["node"]: (folder / f"{token}.{reply['node']}").is_file() for reply in replies}
    finally:
        for path in folder.glob(f"{token}.*"):
            path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
    for reply in replies:
        if reply["storage"] == "ok" and not seen[reply["node"]]:
            reply["storage"] = "the driver cannot see the file this node wrote"
        if reply["storage"] != "ok":
            raise PreflightError(
                f"node {reply['node'][:12]} cannot use the storage path {storage} ({reply['storage']}): "
                "give --output a folder shared by every node (NFS or similar)"
            )
        if reply["tracking"] != "ok":
            raise PreflightError(
                f"node {reply['node'][:12]} cannot reach the tracking server {tracking_uri} ({reply['tracking']})"
            )
    return len(nodes)
