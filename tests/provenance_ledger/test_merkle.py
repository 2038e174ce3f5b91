"""RFC 6962 / 9162 hashing and proofs: the Certificate Transparency vectors, then every proof of
every tree up to 40 leaves against a brute-force recomputation from the RFC's definitions."""

from __future__ import annotations

import hashlib

import pytest

from services.provenance_ledger.domain.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

CT_LEAVES = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (2, 8): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def ct_tree() -> MerkleTree:
    return MerkleTree(leaf_hash(d) for d in CT_LEAVES)


def test_hashing_uses_the_rfc_prefixes():
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]


def test_roots_match_the_certificate_transparency_vectors_at_every_size():
    tree = ct_tree()
    for size, expected in enumerate(CT_ROOTS):
        assert tree.root(size).hex() == expected, size
        assert root_of([leaf_hash(d) for d in CT_LEAVES[:size]]).hex() == expected


@pytest.mark.parametrize(("index", "size"), list(CT_INCLUSION))
def test_inclusion_proofs_match_the_vectors(index, size):
    tree = ct_tree()
    proof = tree.inclusion_proof(index, size)
    assert [p.hex() for p in proof] == CT_INCLUSION[(index, size)]
    assert verify_inclusion(tree.leaf(index), index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("first", "second"), list(CT_CONSISTENCY))
def test_consistency_proofs_match_the_vectors(first, second):
    tree = ct_tree()
    proof = tree.consistency_proof(first, second)
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(first, second)]
    assert verify_consistency(first, second, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second]), proof)


def _reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) written straight from RFC 6962 2.1.1 over a plain list."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return _reference_path(m, leaves[:k]) + [root_of(leaves[k:])]
    return _reference_path(m - k, leaves[k:]) + [root_of(leaves[:k])]


def _reference_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_of(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return _reference_subproof(m, leaves[:k], complete) + [root_of(leaves[k:])]
    return _reference_subproof(m - k, leaves[k:], False) + [root_of(leaves[:k])]


def test_every_proof_of_every_tree_up_to_40_leaves_matches_brute_force_and_verifies():
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(40)]
    tree = MerkleTree(leaves)
    for n in range(1, 41):
        root = root_of(leaves[:n])
        assert tree.root(n) == root
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == _reference_path(m, leaves[:n])
            assert verify_inclusion(leaves[m], m, n, proof, root)
            assert not verify_inclusion(leaves[(m + 1) % n], m, n, proof, root) or n == 1
            if n > 1:
                assert not verify_inclusion(leaves[m], (m + 1) % n, n, proof, root)
            if proof:
                bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1])] + proof[1:]
                assert not verify_inclusion(leaves[m], m, n, bad, root)
                assert not verify_inclusion(leaves[m], m, n, proof[:-1], root)
            assert not verify_inclusion(leaves[m], m, n, proof + [b"\xab" * 32], root)
        for m in range(0, n + 1):
            proof = tree.consistency_proof(m, n)
            expected = [] if m in (0, n) else _reference_subproof(m, leaves[:n], True)
            assert proof == expected
            assert verify_consistency(m, n, root_of(leaves[:m]), root, proof)
            if 0 < m < n:
                assert not verify_consistency(m, n, root_of(leaves[:m]), root, proof[:-1])
                assert not verify_consistency(m, n, root, root, proof)
                bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1])] + proof[1:]
                assert not verify_consistency(m, n, root_of(leaves[:m]), root, bad)


def test_out_of_range_requests_are_refused_and_bad_inputs_do_not_verify():
    tree = ct_tree()
    with pytest.raises(ProofError):
        tree.inclusion_proof(8, 8)
    with pytest.raises(ProofError):
        tree.inclusion_proof(0, 9)
    with pytest.raises(ProofError):
        tree.consistency_proof(5, 3)
    with pytest.raises(ValueError):
        tree.append(b"short")
    root = tree.root()
    assert not verify_inclusion(tree.leaf(0), -1, 8, [], root)
    assert not verify_inclusion(b"x" * 31, 0, 8, tree.inclusion_proof(0), root)
    assert verify_consistency(0, 8, EMPTY_ROOT, root, [])
    assert not verify_consistency(0, 8, EMPTY_ROOT, root, [b"\x00" * 32])
    assert not verify_consistency(8, 6, root, root, [])
