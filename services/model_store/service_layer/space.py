"""Room for an upload, claimed before its bytes are accepted (#20 item 3).

An upload that does not fit is answered InsufficientStorage (507) with the numbers, before it has
written a byte: a disk that fills under nats-server leaves the stream it was writing refusing every
write until NATS restarts. An upload takes room twice while it runs: its spool copy (model-store's
tmp dir) and the Object Store's copy (NATS' store dir, when it is on this machine: `strata up` keeps
it in the same data dir); and the blob store's JetStream limits must hold the Object Store's copy.
Claims of uploads in progress count until they end, so two uploads cannot each take the same room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from shared.errors import InsufficientStorage

from services.model_store.adapters.disks import disk_of, free_bytes

# Left free on every disk an upload uses: nats-server's own writes (events, the catalog, consumer
# state) and model-store's index must never be the ones to find a disk full.
RESERVE_BYTES = 16 * 1024 * 1024


class SpaceGuard:
    def __init__(
        self,
        spool_dir: Path,
        nats_store_dir: Path | None,
        jetstream_room: Callable[[], Awaitable[int | None]],
        reserve: int = RESERVE_BYTES,
    ) -> None:
        self.spool_dir = spool_dir
        self.nats_store_dir = nats_store_dir
        self.jetstream_room = jetstream_room
        self.reserve = reserve
        self._held_on_disk: dict[int, int] = {}  # disk -> bytes claimed by uploads in progress
        self._held_in_jetstream = 0

    @asynccontextmanager
    async def claim(self, *, store: int, spool: int = 0) -> AsyncIterator[None]:
        """Hold room for one upload while it runs: ``store`` bytes for the Object Store's copy, ``spool``
        for a copy still to be spooled here. InsufficientStorage, with the bytes needed and free, when
        it does not fit."""
        room = await self.jetstream_room()
        if room is not None and store + self._held_in_jetstream > room:
            raise InsufficientStorage(
                f"not enough space for {store} bytes: the blob store's JetStream limits leave {room} bytes free"
                + _held(self._held_in_jetstream)
            )
        needs = self._disk_needs(store=store, spool=spool)
        for disk, (path, need) in needs.items():
            free, held = free_bytes(path), self._held_on_disk.get(disk, 0)
            if need + held + self.reserve > free:
                copies = " (its spool copy and the Object Store's)" if need > store else ""
                raise InsufficientStorage(
                    f"not enough space for {store} bytes: the upload needs {need} bytes on the disk of {path}{copies}, "
                    f"which has {free} bytes free, {self.reserve} of them kept for NATS and model-store's own writes"
                    + _held(held)
                )
        # no await from the checks to here: a concurrent claim sees this one
        self._held_in_jetstream += store
        for disk, (_, need) in needs.items():
            self._held_on_disk[disk] = self._held_on_disk.get(disk, 0) + need
        try:
            yield
        finally:
            self._held_in_jetstream -= store
            for disk, (_, need) in needs.items():
                self._held_on_disk[disk] -= need

    def spool_room(self) -> int:
        """What a spool of undeclared size may take on its disk before it must stop (it is claimed, with
        the Object Store's copy, once its size is known): never the reserve, nor what others claimed."""
        held = self._held_on_disk.get(disk_of(self.spool_dir), 0)
        return free_bytes(self.spool_dir) - self.reserve - held

    def _disk_needs(self, *, store: int, spool: int) -> dict[int, tuple[Path, int]]:
        needs: dict[int, tuple[Path, int]] = {}
        places = [(self.spool_dir, spool)]
        if self.nats_store_dir is not None and self.nats_store_dir.is_dir():
            places.append((self.nats_store_dir, store))
        for path, size in places:
            if not size:
                continue
            disk = disk_of(path)
            named, total = needs.get(disk, (path, 0))
            needs[disk] = (named, total + size)
        return needs


def _held(held: int) -> str:
    return f", and uploads in progress have claimed {held}" if held else ""
