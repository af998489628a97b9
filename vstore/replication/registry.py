"""The remote-copy pairs of one deployment, and the look-ups the copy programs need.

Keeps true: at most one pair has a given name; a volume is the source of at most one sync and one
async pair and the target of at most one pair (so "where does a write to primary:A go?" has one
answer). Pairs are addressed as "site:volume". Both sites of a pair persist it in their own
state.json (SPEC §3: both storage systems keep the state); `merge_copies` picks the newer copy
when both survive and the surviving one when a site's directory is gone.
"""

from __future__ import annotations

from collections.abc import Iterator

from vstore.blocks.errors import TricopyError
from vstore.replication.pairs import Pair, PairKind, PairState


def split_ref(ref: str) -> tuple[str, str]:
    site, _, volume = ref.partition(":")
    return site, volume


class PairRegistry:
    def __init__(self, pairs: dict[str, Pair] | None = None) -> None:
        self.pairs: dict[str, Pair] = dict(pairs or {})
        self.versions: dict[str, int] = {name: 0 for name in self.pairs}

    def __iter__(self) -> Iterator[Pair]:
        return iter(sorted(self.pairs.values(), key=lambda p: p.name))

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, name: str) -> Pair:
        try:
            return self.pairs[name]
        except KeyError:
            known = ", ".join(sorted(self.pairs)) or "none"
            raise TricopyError(f"no pair named {name!r} (pairs: {known})") from None

    def add(self, pair: Pair) -> Pair:
        if pair.name in self.pairs:
            raise TricopyError(f"pair {pair.name} already exists; delete it first")
        for other in self.pairs.values():
            if other.target == pair.target:
                raise TricopyError(f"{pair.target} is already the target of pair {other.name}")
            if other.source == pair.source and other.kind == pair.kind:
                raise TricopyError(f"{pair.source} is already the source of {pair.kind.value} pair {other.name}")
        self.pairs[pair.name] = pair
        self.versions[pair.name] = 0
        return pair

    def remove(self, name: str) -> None:
        self.get(name)
        del self.pairs[name]
        self.versions.pop(name, None)

    def from_source(self, ref: str, kind: PairKind) -> Pair | None:
        for p in self.pairs.values():
            if p.source == ref and p.kind == kind:
                return p
        return None

    def into(self, ref: str) -> Pair | None:
        for p in self.pairs.values():
            if p.target == ref:
                return p
        return None

    def involving(self, site: str) -> list[Pair]:
        return [p for p in self if split_ref(p.source)[0] == site or split_ref(p.target)[0] == site]

    def group(self, kind: PairKind, source_site: str) -> list[Pair]:
        """The pairs of one consistency group: same kind, same source site [0128]."""
        return [p for p in self if p.kind == kind and split_ref(p.source)[0] == source_site]

    def live(self, pair: Pair) -> bool:
        return pair.state != PairState.SIMPLEX

    # -- persistence ---------------------------------------------------------------------------
    def bump(self, pair: Pair) -> None:
        self.versions[pair.name] = self.versions.get(pair.name, 0) + 1

    def to_records(self, site: str) -> dict[str, dict]:
        return {p.name: {"version": self.versions.get(p.name, 0), "pair": p.to_dict()} for p in self.involving(site)}

    @classmethod
    def merge_copies(cls, copies: list[dict[str, dict]]) -> PairRegistry:
        """Each site's saved pairs -> one registry; a pair present twice keeps its newer copy."""
        best: dict[str, dict] = {}
        for records in copies:
            for name, rec in records.items():
                if name not in best or rec.get("version", 0) > best[name].get("version", 0):
                    best[name] = rec
        reg = cls({name: Pair.from_dict(rec["pair"]) for name, rec in best.items()})
        reg.versions = {name: int(rec.get("version", 0)) for name, rec in best.items()}
        return reg
