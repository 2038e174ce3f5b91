"""provenance-ledger's public surface for use in another process's own code: the CLI, bench/ and other
tools import these names, never the modules behind them (tests/foundation/test_contracts.py checks it).

Offline, with nothing but files and a public key:

- ``verify_receipt`` (raises ``ReceiptInvalid``): check an inference receipt (`strata receipt verify`);
- ``verify_store``: re-hash a stopped ledger's log and check every signed head (`strata ledger verify
  --data-dir`); ``DB_FILE``: the log's file name in the ledger's data directory.

In-process, for benchmarks: ``Ledger`` (appending ``Incoming`` events), ``EventIngest`` (its batching
consumer), ``MerkleTree``, ``leaf_bytes``, ``leaf_hash``, ``sign_head`` and ``LeafRow``.

These are the ledger's own rules (its leaf encoding, Merkle tree and signatures), so they stay in the
service; the data they read and answer with (TreeHead, Receipt, VerifyReport) is in shared/provenance.py.
"""

from services.provenance_ledger.adapters.ingest import EventIngest
from services.provenance_ledger.adapters.store import LeafRow
from services.provenance_ledger.domain.canonical import leaf_bytes
from services.provenance_ledger.domain.merkle import MerkleTree, leaf_hash
from services.provenance_ledger.domain.receipt import ReceiptInvalid, verify_receipt
from services.provenance_ledger.domain.tree_head import sign_head
from services.provenance_ledger.service_layer.ledger import DB_FILE, Incoming, Ledger, verify_store

__all__ = [
    "DB_FILE", "EventIngest", "Incoming", "LeafRow", "Ledger", "MerkleTree", "ReceiptInvalid", "leaf_bytes",
    "leaf_hash", "sign_head", "verify_receipt", "verify_store",
]
