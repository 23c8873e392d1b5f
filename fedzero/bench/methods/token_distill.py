"""Token-level output distillation for the bench's LM task (distill.level: token; the math:
fedzero.distill.tokens). What the label-level path of methods/dema.py does with label predictions,
this does with next-token ones, for clients that share one tokenizer (the hetero testbed's four
backbones all use SmolLM2's): each client's top-k next-token rows at every position of the public
anchor texts, and its leave-one-out teacher from the others' (mean or quality rule).

The anchors: "domain:<name>", a fortunes domain no client holds (dema.public_anchors), `{"text"}`
records scored at every position, the positions the LM loss trains (template '{text}'; the settings:
spec.DistillSpec.settings). run_dema calls exchange_token_predictions once a round.
"""

from __future__ import annotations

from fedzero.distill.teachers import TeacherRule
from fedzero.distill.token_distiller import TokenDistiller
from fedzero.distill.tokens import check_one_tokenizer, leave_one_out_token_teachers

from .context import send_predictions


def exchange_token_predictions(clients: list, records: list[dict], rule: TeacherRule | None = None) -> dict:
    """Token-level distillation's round in one process (the bench's counterpart of the store's
    publish_token_teachers): each client (a LocalClient with a TokenDistiller) sends its top-k rows and,
    for a rule that needs it, its loss on its own val examples (recorded in the round as "val_loss");
    each receives its leave-one-out teacher. Clients of different tokenizers are refused, naming them.
    Returns {"upload": [bytes per client], "download": [bytes per client]}: ids + probabilities, 4 + 4
    bytes per kept token (a teacher is as wide as the union of the others' supports). Predicting and
    the val loss count in the client's training seconds (they are its own work)."""
    check_one_tokenizer({c.client_id: c.distiller.tokenizer for c in clients})
    predictions, val_losses = send_predictions(clients, records, rule)
    teachers = leave_one_out_token_teachers(predictions, {c.client_id: c.num_samples for c in clients}, rule,
                                            val_losses)
    for client in clients:
        client.distiller.set_teacher(teachers.get(client.client_id))
    return {"upload": [TokenDistiller.payload_bytes(predictions[c.client_id]) for c in clients],
            "download": [TokenDistiller.payload_bytes(teachers[c.client_id]) if c.client_id in teachers else 0
                         for c in clients]}
