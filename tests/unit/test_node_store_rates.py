"""The node store's measured fetch rates: an exponentially weighted mean per source kind,
small fetches left out, kept across a restart, an unreadable file ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.store.rates import LinkRates

MB = 10**6


def test_rates_average_the_fetches_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    rates = LinkRates(path, min_bytes=10 * MB, alpha=0.5)
    assert rates.rates() == {}
    assert rates.observe("remote", 100 * MB, 1.0)
    assert rates.rates() == {"remote": pytest.approx(100 * MB)}
    assert rates.observe("remote", 300 * MB, 1.0)  # half weight on the newest
    assert rates.observe("local", 200 * MB, 0.1)  # a local directory is a read of the disk
    assert rates.rates() == {"remote": pytest.approx(200 * MB), "ssd": pytest.approx(2000 * MB)}
    again = LinkRates(path, min_bytes=10 * MB, alpha=0.5)
    assert again.rates() == rates.rates()
    assert again.observe("remote", 100 * MB, 1.0)
    assert again.rates()["remote"] == pytest.approx(150 * MB)  # the saved mean carried on


def test_small_or_unknown_fetches_are_not_counted(tmp_path: Path) -> None:
    rates = LinkRates(tmp_path / "rates.json", min_bytes=10 * MB)
    assert not rates.observe("remote", 9 * MB, 0.001)  # latency, not bandwidth
    assert not rates.observe("dram", 100 * MB, 1.0)
    assert not rates.observe("remote", 100 * MB, 0.0)
    assert rates.rates() == {} and not (tmp_path / "rates.json").exists()


def test_an_unreadable_rates_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_text("{not json")
    assert LinkRates(path).rates() == {}
    path.write_text('{"remote": {"bytes_per_s": -1, "samples": 3}, "ssd": [1]}')
    assert LinkRates(path).rates() == {}
