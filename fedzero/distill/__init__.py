"""Knowledge transfer through outputs on the public anchor set (method.md's fallback across widths).

Averaging weights in the shared r-space only carries knowledge if z means the same on every client.
Outputs always do: every client scores the same public anchor prompts over the same label words, so
their predictions are comparable whatever the backbone, its width or its vocabulary. Each round

    client k -> P_k [N, C]   its adapted model's label distribution on the N anchor prompts
                (and L_k, its mean loss on its own held-out examples, when the teacher rule needs it)
    server   -> T_k[n] = sum_{j != k} w_jn P_j[n] / sum_{j != k} w_jn
                    teacher "mean":    w_jn = s_j                            (s_j: client j's sample count)
                    teacher "quality": w_jn = s_j * exp(-L_j) * max_c P_j[n, c]
                    only_stronger:     only clients j with L_j < L_k
    client k    trains on  task loss + lambda * KL(T_k || P_k(student))  over a few anchors per step

A client never distils from itself, and no private data or weights leave it (N x C floats and one
loss travel: 64 anchors x 3 labels = 768 B per client-round). It composes with any weight strategy
(local, fedavg, cmga). Every path that publishes teachers (fedzero simulate, the MPI aggregator,
the benchmark) calls leave_one_out_teachers.

``distill.level: token`` (among clients of one tokenizer) exchanges next-token distributions instead:
at every scored anchor position the top-k token ids and their probabilities renormalised over the k,
teachers on the union of the others' supports under the same rules, and KL(T_k || model) against the
model's full-vocabulary softmax (``tokens``, ``token_distiller``; docs/method.md).

Modules: ``settings`` (the run config's ``distill:`` section, DistillSettings), ``distiller`` (the
client side: anchor predictions and the KL term, AnchorDistiller), ``teachers`` (the server side:
TeacherRule and the leave-one-out mixtures), ``publish`` (the aggregator's step: predictions in the
store become the next round's teachers), ``tokens`` (token level: top-k encoding, sparse teachers,
the sparse KL, tokenizer fingerprints) and ``token_distiller`` (token level: TokenDistiller). The store keeps the files (anchor predictions, teachers).
Nothing is imported here: the MPI aggregator needs only ``teachers``, without the clients' stack.
"""
