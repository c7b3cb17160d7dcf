"""What an `--executor-config` file (and `run-claim`'s options) may say: the `local:` and
`slurm:` blocks, validated once (see spec/slurm.example.yaml)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trades_repro import yamlio
from trades_repro.errors import BadInput

MAX_MINUTES = 366 * 24 * 60  # no site grants a year; more is a misread time (see _slurm_time)


class LocalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    jobs: Annotated[int, Field(ge=1)] | None = None  # None: GPUs × jobs_per_gpu, or 1 on CPU
    jobs_per_gpu: Annotated[int, Field(ge=1)] = 1


class SlurmConfig(BaseModel):
    """A `slurm:` block of an executor config (see spec/slurm.example.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    partition: str | None = None
    time: Annotated[int, Field(ge=1)] | str = 24 * 60  # minutes, or sbatch's forms
    gpus: Annotated[int, Field(ge=0)] = 1  # per run
    cpus: Annotated[int, Field(ge=1)] = 8  # per run: data prep and the attacks' host side
    mem_gb: Annotated[float, Field(gt=0)] | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: Annotated[int, Field(ge=1)] = 256  # runs of the array at once
    max_num_timeout: Annotated[int, Field(ge=0)] = 20  # requeues after a time-out
    setup: list[str] = []  # shell lines before the job (module load, conda activate, …)
    cluster: Literal["slurm", "debug"] = "slurm"  # debug: in this process (tests)
    wait: bool = False  # block until the array ends, then judge (default: submit and exit)

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: int | str) -> int | str:
        if isinstance(value, str) and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", value):
            raise ValueError(f"time {value!r}: minutes, or MM:SS, HH:MM:SS, D-HH[:MM[:SS]] as "
                             "sbatch takes")
        minutes = slurm_minutes(value)
        if minutes < 1:  # sbatch's --time=0 is no limit at all
            raise ValueError(f"time {value!r}: under a minute; give the limit a run needs")
        if minutes > MAX_MINUTES:
            hint = (": an unquoted HH:MM:SS in YAML reads as a base-60 number; quote it, "
                    'e.g. time: "24:00:00"') if isinstance(value, int) else ""
            raise ValueError(f"time {value!r}: {minutes} minutes is over a year{hint}")
        return value

    def minutes(self) -> int:
        """`time` in whole minutes (submitit's unit), rounding seconds up."""
        return slurm_minutes(self.time)

    def parameters(self) -> dict:
        """AutoExecutor's parameters: shared ones plain, SLURM-only ones `slurm_`-prefixed."""
        params = {"name": "trades-repro", "timeout_min": self.minutes(),
                  "gpus_per_node": self.gpus, "cpus_per_task": self.cpus,
                  "mem_gb": self.mem_gb, "slurm_partition": self.partition,
                  "slurm_account": self.account, "slurm_qos": self.qos,
                  "slurm_array_parallelism": self.array_parallelism,
                  "slurm_additional_parameters": {"requeue": True},  # preemptible
                  "slurm_setup": self.setup or None}
        return {k: v for k, v in params.items() if v is not None}


def slurm_minutes(time: int | str) -> int:
    """A time limit in whole minutes, read as sbatch reads it: M, M:S, H:M:S, D-H, D-H:M,
    D-H:M:S (so "30:00" is 30 minutes, not 30 hours); seconds round up."""
    if isinstance(time, int) or ("-" not in time and ":" not in time):
        return int(time)
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if not days and len(parts) == 2:  # M:S
        parts = [0, *parts]
    hours, mins, secs = (parts + [0, 0])[:3]
    return int(days or 0) * 1440 + hours * 60 + mins + (secs > 0)


class ExecutorConfig(BaseModel):
    """An `--executor-config` file: a `slurm:` block and/or a `local:` block."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    slurm: SlurmConfig = SlurmConfig()
    local: LocalConfig = LocalConfig()


def load_config(path: Path | None) -> ExecutorConfig:
    if path is None:
        return ExecutorConfig()
    try:
        text = yamlio.read_text(path)
        _refuse_base60_time(text, path)
        return ExecutorConfig.model_validate(yamlio.load(text) or {})
    except yamlio.YAMLFileError as err:  # missing, unreadable or not UTF-8
        raise BadInput(f"--executor-config: {err}") from None
    except (ValidationError, yaml.YAMLError) as err:
        raise BadInput(f"{path}: {first_line(err)}") from None


def _refuse_base60_time(text: str, path: Path) -> None:
    """YAML 1.1 (PyYAML) reads an unquoted `time: 24:00:00` as the base-60 integer 86400,
    which `time` would take as minutes (60 days): refuse it, as written, with the fix."""
    time = _child(_child(yaml.compose(text, Loader=yaml.SafeLoader), "slurm"), "time")
    if isinstance(time, yaml.ScalarNode) and time.style is None and ":" in time.value \
            and time.tag == "tag:yaml.org,2002:int":
        raise BadInput(f"{path}: slurm.time: {time.value} unquoted is the base-60 number "
                       f"{yaml.safe_load(time.value)} (read as minutes); quote it: "
                       f'time: "{time.value}"')


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key),
                None)


def first_line(err: BaseException) -> str:
    """One line: a pydantic error's first field and message, else the message's first line."""
    if isinstance(err, ValidationError) and err.errors():
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not _union_tag(p))
        return f"{where}: {first['msg']}" if where else first["msg"]
    return (str(err).strip().splitlines() or [""])[0]


def _union_tag(part: object) -> bool:
    """pydantic's name for the member of a union that failed ('constrained-int', 'str'):
    in an error's location it is not a field the user wrote."""
    return isinstance(part, str) and (part in {"int", "str", "float", "bool"}
                                      or "-" in part or "[" in part)


__all__ = ["ExecutorConfig", "LocalConfig", "SlurmConfig", "first_line", "load_config",
           "slurm_minutes"]
