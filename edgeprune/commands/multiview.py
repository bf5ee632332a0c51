"""`edgeprune branch` and `edgeprune fusion`: the multi-view (MVCNN-style) topology of SlimEdge,
one branch node per camera view and one fusion node (nodes/fusion.py, docs/slimedge.md)."""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path
from typing import Any

from edgeprune.commands._common import add_mqtt, mqtt_settings, pipe_name, run_service

log = logging.getLogger("edgeprune.multiview")

DEFAULT_MULTIVIEW = Path("models/multiview-xs.pt")

TOPOLOGY = """\
Topology (edgeprune/<pipe>/...):

  camera of view v --raw crop, msgpack--> view/<v>
  branch node v (edgeprune branch --view v): runs view v's branch at its level, mean-pools
                   --kept feature channels--> fusion/<v>
  fusion node (edgeprune fusion): element-wise max over the views that arrived, classifier
                   --JSON label--> results
  per-view level:  control/view/<v>   JSON {"kind": "level", "level": L, ...}, RETAINED
  liveness:        nodes/<node>/status (Last Will "offline", retained)

The checkpoint is a multi-view model (one branch per view; train one with `edgeprune bench
planner --multiview --train`). Per-view levels come from the planner (controller.slimedge /
pipeline.multiview.view_levels) and are published retained on control/view/<v>; a branch node
switches level between requests. See docs/slimedge.md.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 92) + "\n\n" + TOPOLOGY


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_MULTIVIEW,
        help="multi-view checkpoint (default models/multiview-xs.pt)",
    )
    parser.add_argument(
        "--ratios",
        default=None,
        help="pruning levels as ratios (default 0,0.1,0.2,0.3,0.4,0.5); every "
        "node of the topology must use the same",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_mqtt(parser)


def register(sub: argparse._SubParsersAction) -> None:
    branch = sub.add_parser(
        "branch",
        help="multi-view: run one view's branch as an MQTT service",
        description=_wrap(
            "A branch node of the multi-view topology: subscribes to view/<v> (raw crops of "
            "one camera view), runs that view's branch of the multi-view model at the level "
            "retained on control/view/<v> (all levels built at start-up), and publishes the "
            "pooled features (kept channels and their indices) to fusion/<v>."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    branch.add_argument(
        "--view",
        type=int,
        required=True,
        help="view index v (0-based; the checkpoint names its views)",
    )
    branch.add_argument("--node-id", default=None, help="node name (default view<v>)")
    _common(branch)
    branch.set_defaults(func=run_branch)

    fusion = sub.add_parser(
        "fusion",
        help="multi-view: fuse the views' features and classify",
        description=_wrap(
            "The fusion node of the multi-view topology: subscribes to fusion/+, takes the "
            "element-wise max over the views of a request and publishes one result per request "
            "on results (label, score, views fused, views missing, levels). It waits for a "
            "request's views up to --timeout after the first arrived, then fuses what it has; a "
            "view that missed --fail-after fusions in a row is dropped (not waited for) until "
            "it delivers again."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fusion.add_argument(
        "--timeout",
        type=float,
        default=0.5,
        help="seconds to wait for the other views after a request's first (default 0.5)",
    )
    fusion.add_argument(
        "--fail-after",
        type=int,
        default=3,
        help="a view missing this many fusions in a row is failed and no "
        "longer waited for (default 3)",
    )
    fusion.add_argument("--node-id", default="fusion", help="node name (default fusion)")
    _common(fusion)
    fusion.set_defaults(func=run_fusion)


def _model(args: argparse.Namespace) -> Any:  # -> PrunedMultiView
    import torch

    from pipeline.multiview import MultiViewCheckpoint, PrunedMultiView
    from pipeline.pruning import DEFAULT_RATIOS

    if args.threads < 1:
        from pipeline.errors import ConfigError

        raise ConfigError("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    ratios = DEFAULT_RATIOS if not args.ratios else tuple(float(r) for r in args.ratios.split(","))
    model = PrunedMultiView(MultiViewCheckpoint.load(args.checkpoint), ratios)
    log.info(
        "%s: views %s, levels %s",
        args.checkpoint,
        [v.name for v in model.ckpt.config.views],
        list(model.ratios),
    )
    return model


def build_branch(args: argparse.Namespace, model: Any | None = None) -> Any:  # -> BranchNode
    from nodes.fusion import BranchNode
    from pipeline.errors import ConfigError

    model = model if model is not None else _model(args)
    n_views = len(model.branches)
    if not 0 <= args.view < n_views:
        raise ConfigError(
            f"--view must be in [0, {n_views}): {args.checkpoint} has {n_views} views"
        )
    return BranchNode(mqtt_settings(args), pipe_name(args), args.view, model, node_id=args.node_id)


def build_fusion(args: argparse.Namespace, model: Any | None = None) -> Any:  # -> FusionNode
    from nodes.fusion import FusionNode
    from pipeline.errors import ConfigError

    if args.timeout <= 0 or args.fail_after < 1:
        raise ConfigError("need --timeout > 0 and --fail-after >= 1")
    model = model if model is not None else _model(args)
    return FusionNode(
        mqtt_settings(args),
        pipe_name(args),
        model,
        timeout_s=args.timeout,
        fail_after=args.fail_after,
        node_id=args.node_id,
    )


def run_branch(args: argparse.Namespace) -> int:
    node = build_branch(args)
    log.info("branch node %s: view %d on %s", node.node_id, node.view, node.topics.view(node.view))
    return run_service(node.run)


def run_fusion(args: argparse.Namespace) -> int:
    node = build_fusion(args)
    log.info(
        "fusion node %s: %d views, timeout %.2f s, fail after %d",
        node.node_id,
        node.n_views,
        node.timeout_s,
        node.fail_after,
    )
    return run_service(node.run)
