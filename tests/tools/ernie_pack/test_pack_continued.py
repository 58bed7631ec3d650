"""CONTINUED pieces, rejoined. Under --policy concat every document comes back from the shards alone; under
--policy bfd it cannot, and this test shows why, then checks what bfd does guarantee (docs/formats/shards.md)."""
from collections import Counter

import numpy as np
from pack_corpus import pretrain_docs, write_jsonl

from ernie_pack.api import PackOptions, pack
from libernie.data import FLAG_CONTINUED, PackedDataset

SEQ_LEN = 48


def _corpus(tmp_path, tok):
    docs = pretrain_docs(80, seed=5, max_sentences=24)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    want = [tuple(tok.encode(d)) + (tok.eos_id,) for d in docs]
    assert sum(len(w) > 2 * SEQ_LEN for w in want) >= 10  # long documents, cut into three pieces or more
    return inp, want


def _stream(prefix):
    """Every segment in dataset order: (sequence, segment index, its tokens, CONTINUED?)."""
    ds = PackedDataset(prefix, pad=False)
    for i in range(len(ds)):
        ids = ds[i].input_ids
        for k, (a, b, flags) in enumerate(ds.segments(i)):
            yield i, k, tuple(int(t) for t in ids[a:b]), bool(flags & FLAG_CONTINUED)


def _rejoin(stream):
    """The reader's rule from the spec: a CONTINUED piece joins the document open at the end of the stream."""
    docs = []
    for _, _, tokens, cont in stream:
        if cont:
            docs[-1] += tokens
        else:
            docs.append(tokens)
    return docs


def test_concat_rejoins_every_document_in_order(tmp_path, tokenizer_path, tok):
    inp, want = _corpus(tmp_path, tok)
    pack(PackOptions("pretrain", tokenizer_path, SEQ_LEN, str(tmp_path / "c"), [str(inp)], policy="concat"))
    stream = list(_stream(tmp_path / "c"))
    assert all(k == 0 for _, k, _, cont in stream if cont)  # a piece always opens the next sequence
    assert _rejoin(stream) == want


def test_bfd_pieces_cannot_be_rejoined_from_the_shards_but_keep_their_order(tmp_path, tokenizer_path, tok):
    inp, want = _corpus(tmp_path, tok)
    pack(PackOptions("pretrain", tokenizer_path, SEQ_LEN, str(tmp_path / "b"), [str(inp)], policy="bfd"))
    stream = list(_stream(tmp_path / "b"))
    # Why not: a tail piece is placed by best fit into any open sequence, often after other segments, so it
    # does not continue "the end of the previous sequence"; pieces of other documents come in between, so
    # the reader's rule attaches pieces to the wrong documents.
    assert any(k > 0 for _, k, _, cont in stream if cont)
    assert Counter(_rejoin(stream)) != Counter(want)
    # What holds: every document is there as its seq_len cuts, the first unflagged, the rest CONTINUED,
    # each piece exactly once, and one document's pieces appear in the dataset in their order.
    cuts = [[w[a:a + SEQ_LEN] for a in range(0, len(w), SEQ_LEN)] for w in want]
    expected = Counter((p, j > 0) for pieces in cuts for j, p in enumerate(pieces))
    assert Counter((tokens, cont) for _, _, tokens, cont in stream) == expected
    at = {tokens: n for n, (_, _, tokens, _) in enumerate(stream)}
    unique = [pieces for pieces in cuts if all(expected[(p, j > 0)] == 1 for j, p in enumerate(pieces))]
    assert sum(len(pieces) > 2 for pieces in unique) >= 10  # short tails (". </s>") may repeat; the rest do not
    for pieces in unique:
        assert np.all(np.diff([at[p] for p in pieces]) > 0)


def test_inspect_says_whether_a_piece_continues_the_previous_sequence(tmp_path, tokenizer_path, tok):
    from ernie_pack.api import inspect
    inp, _ = _corpus(tmp_path, tok)
    for policy in ("concat", "bfd"):
        pack(PackOptions("pretrain", tokenizer_path, SEQ_LEN, str(tmp_path / policy), [str(inp)], policy=policy))
        stream = list(_stream(tmp_path / policy))
        i = next(i for i, k, _, cont in stream if cont)  # first sequence holding a CONTINUED piece
        segs = inspect(str(tmp_path / policy), i)["sequence"]["segments"]
        flagged = [s for s in segs if s["continued"]]
        assert flagged and all(s["continues_previous_sequence"] == (policy == "concat") for s in flagged)
