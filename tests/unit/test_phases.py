"""Migration phases: one enum, the same set as the metadata database's CHECK constraint."""

from __future__ import annotations

import re
from importlib import resources

from dialogs.wire import ABORTABLE_PHASES, FINISHED_PHASES, Phase


def test_the_enum_is_the_databases_set_of_phases() -> None:
    """The SQL CHECK and the unique 'one active migration' index name the enum's values."""
    sql = resources.files("dialogs.schema.metadata").joinpath("0002_resharding.sql").read_text()
    check = re.search(r"CHECK \(phase IN\s*\(([^)]*)\)\)", sql)
    assert check is not None
    assert set(re.findall(r"'(\w+)'", check[1])) == {phase.value for phase in Phase}
    active_index = re.search(r"migrations_one_active .* WHERE phase NOT IN \(([^)]*)\)", sql)
    assert active_index is not None
    assert set(re.findall(r"'(\w+)'", active_index[1])) == set(FINISHED_PHASES)


def test_only_phases_before_the_flip_are_abortable() -> None:
    """Once cleanup began the new map is active: the way back is another migration."""
    assert sorted([Phase.PREPARE, Phase.COPY, Phase.CATCHUP, Phase.CUTOVER]) == ABORTABLE_PHASES
    assert not Phase.CLEANUP.abortable and Phase.DONE.finished and not Phase.ABORTING.finished


def test_the_ownership_enum_is_the_shard_databases_set_of_states() -> None:
    """shard_ranges.state's CHECK (the last one the shard schema sets) names the enum's values."""
    from dialogs.wire import Ownership

    folder = resources.files("dialogs.schema.shard")
    sql = "\n".join(
        folder.joinpath(name).read_text() for name in sorted(e.name for e in folder.iterdir()) if name.endswith(".sql")
    )
    checks = re.findall(r"CHECK \(state IN \(([^)]*)\)\)", sql)
    assert checks, "no CHECK on shard_ranges.state"
    assert {value.strip().strip("'") for value in checks[-1].split(",")} == set(Ownership)
