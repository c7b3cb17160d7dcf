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


class LocalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    jobs: Annotated[int, Field(ge=1)] | None = None  # None: GPUs × jobs_per_gpu, or 1 on CPU
    jobs_per_gpu: Annotated[int, Field(ge=1)] = 1


class SlurmConfig(BaseModel):
    """A `slurm:` block of an executor config (see spec/slurm.example.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    partition: str | None = None
    time: Annotated[int, Field(ge=1)] | str = 24 * 60  # minutes, or [D-]HH:MM[:SS]
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
            raise ValueError(f"time {value!r}: minutes, or [D-]HH[:MM[:SS]] as sbatch takes")
        return value

    def minutes(self) -> int:
        """`time` in whole minutes (submitit's unit), rounding seconds up."""
        if isinstance(self.time, int) or ("-" not in self.time and ":" not in self.time):
            return int(self.time)
        days, _, clock = self.time.rpartition("-")
        hours, mins, secs = ([int(p) for p in clock.split(":")] + [0, 0])[:3]
        return int(days or 0) * 1440 + hours * 60 + mins + (secs > 0)

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


class ExecutorConfig(BaseModel):
    """An `--executor-config` file: a `slurm:` block and/or a `local:` block."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    slurm: SlurmConfig = SlurmConfig()
    local: LocalConfig = LocalConfig()


def load_config(path: Path | None) -> ExecutorConfig:
    if path is None:
        return ExecutorConfig()
    try:
        return ExecutorConfig.model_validate(yamlio.load(yamlio.read_text(path)) or {})
    except yamlio.YAMLFileError as err:  # missing, unreadable or not UTF-8
        raise BadInput(f"--executor-config: {err}") from None
    except (ValidationError, yaml.YAMLError) as err:
        raise BadInput(f"{path}: {first_line(err)}") from None


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


__all__ = ["ExecutorConfig", "LocalConfig", "SlurmConfig", "first_line", "load_config"]
