"""Token-level output distillation (`distill.level: token`): the math, shared by the clients, the
aggregator (simulate and MPI alike) and the benchmark. Plain numpy/torch, no model code.

Clients that share one tokenizer (hence one vocabulary, checked by :func:`tokenizer_fingerprint`)
exchange next-token distributions instead of label distributions. On the anchor texts each client
sends, at every scored position n (P positions in all; which positions: fedzero.distill.token_distiller),
its top-k next tokens and their probabilities *renormalised over the top k*:

    ids[n, i]   = the i-th most likely token id at n        (int32, i < k)
    probs[n, i] = p(ids[n, i]) / sum_{i' < k} p(ids[n, i'])  (float32; each row sums to 1)

P x k x 8 bytes per client-round, whatever the vocabulary (64 anchors x 64 positions x 16 x 8 B = 512 kB).

The teacher of client c at position n is the leave-one-out mixture of the other clients' sparse
rows on the union of their supports:

    T_c[n, v] = sum_{j != c} a_jn q_j[n, v]          q_j[n, v] = probs_j[n, i] if ids_j[n, i] = v, else 0
    "mean":    a_jn = s_j / sum_{j' != c} s_j'                       (s_j: client j's sample count)
    "quality": a_jn = s_j exp(-L_j) max_i probs_j[n, i]  normalised over j != c

(the label-level rules, teachers.quality_weights, with the confidence taken on the renormalised top-k row,
in [1/k, 1]). Since the a_jn sum to one over j and every q_j row sums to one, so does T_c[n]; it is
renormalised once more against rounding. It is stored padded to the widest union (id -1, probability 0).

The student's term (:func:`sparse_kl`): the sparse teacher read as a distribution over the whole
vocabulary (zero off its support), against the model's full-vocabulary softmax p:

    KL(T[n] || p[n]) = sum_{v in supp T[n]} T[n, v] (log T[n, v] - log p[n, v])
                     = CE(T[n], p[n]) - H(T[n])

averaged over the positions of the step's anchors, times distill.weight. It is >= 0 and 0 exactly when
the model puts the teacher's probabilities on its support and nothing elsewhere: mass the model puts
outside the teacher's top tokens is pulled back (the teacher dropped its tail when it renormalised).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

PAD_ID = -1          # the padding of a teacher row narrower than the widest (probability 0)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what makes token ids mean the same on two clients: the vocabulary (token -> id)
    and its special ids. Two clients distil token-level only when theirs are equal."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
        desc = {"vocab": vocab, "size": len(hf)}
    else:       # fedzero.data.ByteTokenizer and other id <-> byte tokenizers without a vocab file
        desc = {"name": getattr(tokenizer, "name", type(tokenizer).__name__), "size": int(len(tokenizer))}
    desc["special"] = [getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id")]
    return hashlib.sha256(json.dumps(desc, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def check_one_tokenizer(fingerprints: dict[str, str], when: str = "") -> str | None:
    """The one tokenizer fingerprint of these clients ({client: fingerprint}; None for none), or a
    ValueError naming the clients of each tokenizer: token-level teachers mix token ids, which mean
    the same only under one vocabulary."""
    groups: dict[str, list[str]] = {}
    for c, fp in fingerprints.items():
        groups.setdefault(fp, []).append(c)
    if len(groups) > 1:
        listed = "; ".join(f"tokenizer {fp}: clients {sorted(cs)}" for fp, cs in sorted(groups.items()))
        raise ValueError(f"distill.level 'token' needs clients that share one tokenizer (one vocabulary)"
                         f"{when}, found {len(groups)}: {listed}. Use distill.level: label across vocabularies")
    return next(iter(groups), None)


def top_k_encode(logits: torch.Tensor, k: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, V] logits -> (ids [P, k] int32, probs [P, k] float32): the k most likely ids among the first
    `vocab_size` (the tokenizer's ids; a model's head may be padded wider), most likely first, and their
    probabilities renormalised over those k (a softmax of the k logits: the same ratios as the full
    softmax's). Ties are broken by torch.topk."""
    logits = logits.detach()
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"distill.top_k must be in [1, {logits.shape[-1]}] (the vocabulary), got {k}")
    top, ids = torch.topk(logits.float(), k, dim=-1)      # float32 is exact for bf16/fp16 logits too
    return ids.to(torch.int32), torch.softmax(top.double(), dim=-1).float()


def check_sparse(ids: np.ndarray, probs: np.ndarray, *, allow_pad: bool = False) -> str | None:
    """Why sparse rows (ids [P, k], probs [P, k]) cannot be used, or None: the same shape, ids >= 0
    (PAD_ID with probability 0 when allow_pad), no id twice in a row, finite probabilities >= 0 summing
    to 1 per row."""
    ids, probs = np.asarray(ids), np.asarray(probs, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != probs.shape or ids.size == 0:
        return f"ids {ids.shape} and probs {probs.shape} are not two equal [positions, k] arrays"
    if not np.issubdtype(ids.dtype, np.integer):
        return f"ids are {ids.dtype}, not integers"
    pad = ids == PAD_ID
    if (ids < 0).any() and not (allow_pad and ((ids >= 0) | pad).all()):
        return "holds negative token ids"
    if allow_pad and (probs[pad] != 0).any():
        return "gives a padding id a probability"
    if not np.isfinite(probs).all() or (probs < 0).any():
        return "holds non-finite or negative probabilities"
    srt = np.sort(np.where(pad, -1 - np.arange(ids.shape[1])[None, :], ids), axis=1)   # pads never collide
    if (srt[:, 1:] == srt[:, :-1]).any():
        return "names a token twice in one row"
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        return "rows do not sum to 1"
    return None


def token_mixing_weights(probs: dict[str, np.ndarray], weights: dict[str, float], teacher: str,
                         val_losses: dict[str, float] | None) -> np.ndarray:
    """[J, P] mixing weights a_jn of the clients given (in their order), each column summing to 1:
    the label-level rules (teachers.quality_weights) with the confidence max_i probs_j[n, i]."""
    from fedzero.distill.teachers import quality_weights

    ids = list(probs)
    if teacher == "mean":
        s = np.array([float(weights[c]) for c in ids], dtype=np.float64)
        return np.repeat((s / s.sum())[:, None], np.asarray(probs[ids[0]]).shape[0], axis=1)
    # quality_weights reads the confidence as a row's maximum: give it each row's maximum alone ([P, 1]),
    # so clients sending different k mix as well
    return quality_weights({c: np.asarray(probs[c], dtype=np.float64).max(axis=1, keepdims=True) for c in ids},
                           weights, val_losses)


def mix_sparse(rows: list[tuple[np.ndarray, np.ndarray]], alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mixture sum_j alpha[j, n] q_j[n] of J sparse row sets (ids [P, k_j], probs [P, k_j]) on the union
    of their supports, each row renormalised to 1: (ids [P, W], probs [P, W]) with W the widest union,
    entries in each row by decreasing probability (then increasing id), padded with PAD_ID / 0."""
    P = np.asarray(rows[0][0]).shape[0]
    all_ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in rows], axis=1)           # [P, sum k]
    all_vals = np.concatenate([alpha[j][:, None] * np.asarray(p, dtype=np.float64)
                               for j, (_, p) in enumerate(rows)], axis=1)
    keep = all_ids >= 0                          # a teacher's padding never enters a mixture
    row_of = np.broadcast_to(np.arange(P)[:, None], all_ids.shape)[keep]
    vocab = int(all_ids.max()) + 1
    keys, inverse = np.unique(row_of * vocab + all_ids[keep], return_inverse=True)
    mass = np.bincount(inverse, weights=all_vals[keep], minlength=len(keys))
    r, v = keys // vocab, keys % vocab
    # order each row by decreasing mass, then increasing id: lexsort's last key is the primary one
    order = np.lexsort((v, -mass, r))
    r, v, mass = r[order], v[order], mass[order]
    counts = np.bincount(r, minlength=P)
    col = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max())
    ids = np.full((P, width), PAD_ID, dtype=np.int64)
    out = np.zeros((P, width), dtype=np.float64)
    ids[r, col], out[r, col] = v, mass
    out /= out.sum(axis=1, keepdims=True)
    return ids, out


def leave_one_out_token_teachers(predictions: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float],
                                 rule=None, val_losses: dict[str, float] | None = None
                                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{client: (ids [P, k], probs [P, k])} -> {client: its teacher (ids [P, W], probs [P, W])}: the module
    doc's T_c, built from the other clients only (same eligibility as teachers.leave_one_out_teachers:
    weight > 0, and under only_stronger a strictly lower held-out loss). A client without such another
    client gets no teacher."""
    from fedzero.distill.teachers import TeacherRule, leave_one_out

    rule = rule or TeacherRule()
    cids = list(predictions)
    positions = {np.asarray(predictions[c][0]).shape[0] for c in cids}
    if len(positions) > 1:
        raise ValueError(f"token predictions over different numbers of positions {sorted(positions)}: "
                         "clients scored different anchors")
    return leave_one_out(cids, weights, rule, val_losses,
                         lambda others, losses: mixture_of(predictions, weights, others, rule.teacher, losses))


def mixture_of(predictions: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float], clients: list[str],
               teacher: str, val_losses: dict[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """The teacher made of `clients` (each with weight > 0) under rule `teacher`."""
    alpha = token_mixing_weights({c: np.asarray(predictions[c][1], dtype=np.float64) for c in clients},
                                 weights, teacher, val_losses)
    return mix_sparse([predictions[c] for c in clients], alpha)


def sparse_kl(student_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(T || student): student_logp [P, V] full-vocabulary log-probabilities,
    the teacher sparse (ids [P, W], PAD_ID where a row is narrower; probs [P, W], 0 there). The module
    doc's formula: sum over the support of T (log T - log p), where 0 log 0 = 0."""
    probs = teacher_probs.to(student_logp)
    ids = teacher_ids.to(student_logp.device).long()
    if (ids >= student_logp.shape[-1]).any():
        raise ValueError(f"teacher names token id {int(ids.max())}, beyond the model's {student_logp.shape[-1]} "
                         "logits: clients of different vocabularies cannot distil token-level")
    live = (ids >= 0) & (probs > 0)
    logp = student_logp.gather(1, ids.clamp_min(0))
    terms = torch.where(live, probs * (probs.clamp_min(1e-30).log() - logp), torch.zeros_like(probs))
    return terms.sum(dim=1).mean()


def round_token_teachers(predictions: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float], rule=None,
                         val_losses: dict[str, float] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the aggregator publishes for the next round, as teachers.round_teachers at the label level:
    every predicting client's leave-one-out teacher and, when two or more clients carry weight and not
    under only_stronger, under ALL_CLIENTS the mixture of all of them (for a client that sent none)."""
    from fedzero.distill.teachers import TeacherRule, check_val_losses
    from fedzero.store.store import ALL_CLIENTS

    rule = rule or TeacherRule()

    def as_tensors(t):
        return torch.as_tensor(t[0], dtype=torch.int32), torch.as_tensor(t[1], dtype=torch.float32)

    teachers = {k: as_tensors(v) for k, v in leave_one_out_token_teachers(predictions, weights, rule,
                                                                          val_losses).items()}
    weighted = [c for c in predictions if weights.get(c, 0) > 0]
    if len(weighted) >= 2 and not rule.only_stronger:
        losses = check_val_losses(val_losses, weighted) if rule.needs_quality else None
        teachers[ALL_CLIENTS] = as_tensors(mixture_of(predictions, weights, weighted, rule.teacher, losses))
    return teachers
