"""Run identity: the digest covers what changes results, not where the data lives."""

from __future__ import annotations

import pytest

from trades_repro.spec import ExperimentSpec, parse_spec

# The default spec's digest, pinned: a change here renames every run folder on users' disks.
DEFAULT_DIGEST = "357e671213af2a9e"


def test_default_digest_is_pinned():
    assert ExperimentSpec().digest() == DEFAULT_DIGEST


@pytest.mark.parametrize("data", [{"root": "/scratch/$USER/data"}, {"download": True},
                                  {"root": "elsewhere", "download": True}])
def test_data_location_is_not_identity(data):
    assert parse_spec({"data": data}).digest() == DEFAULT_DIGEST


@pytest.mark.parametrize("data", [{"dataset": "cifar10"}, {"val_size": 999},
                                  {"train_subset": 10}, {"augment": False}])
def test_what_the_run_reads_is_identity(data):
    assert parse_spec({"data": data}).digest() != DEFAULT_DIGEST


def test_device_and_performance_are_identity():
    assert parse_spec({"device": "cpu"}).digest() != DEFAULT_DIGEST
    assert parse_spec({"performance": {"tf32": True}}).digest() != DEFAULT_DIGEST
