"""Cluster and ``cstorch.backends.csx`` settings of a Cerebras run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gigagpt.accelerators.bridge_errors import import_cstorch

BACKENDS = ("CSX", "CPU", "GPU")


@dataclass
class ClusterSettings:
    """Fields of ``cstorch.distributed.ClusterConfig`` (``None``: cstorch's default)."""

    mgmt_address: str | None = None
    mgmt_namespace: str | None = None
    credentials_path: str | None = None
    num_csx: int = 1
    max_wgt_servers: int | None = None
    max_act_per_csx: int | None = None
    num_workers_per_csx: int | None = None
    mount_dirs: list[str] = field(default_factory=list)
    python_paths: list[str] = field(default_factory=list)
    job_labels: list[str] = field(default_factory=list)
    job_priority: str | None = None
    job_time_sec: int | None = None
    disable_version_check: bool | None = None
    workflow_id: str | None = None
    automount: bool | None = None
    cbcore_image: str | None = None

    def to_cluster_config(self):
        cstorch = import_cstorch()
        values = {k: v for k, v in asdict(self).items() if v is not None and v != []}
        return cstorch.distributed.ClusterConfig(**values)

    @property
    def workers_per_csx(self) -> int:
        return self.num_workers_per_csx or 1


def apply_csx_settings(settings: dict[str, Any]) -> None:
    """Set ``cstorch.backends.csx.<group>.<name>`` from ``{"<group>.<name>": value}``."""
    cstorch = import_cstorch()
    for key, value in settings.items():
        group_name, _, name = key.rpartition(".")
        group = getattr(cstorch.backends.csx, group_name, None) if group_name else None
        if group is None or not hasattr(group, name):
            raise ValueError(
                f"unknown Cerebras setting csx_settings[{key!r}]; use '<group>.<name>' with group one of "
                "performance, precision, debug (e.g. 'debug.lazy_initialization' or "
                "'debug.compile_crd_memory_gi')"
            )
        setattr(group, name, value)
