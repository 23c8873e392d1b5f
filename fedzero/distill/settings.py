"""The run config's `distill:` section: which anchors, template and label words the clients score,
and the teacher rule (fedzero.distill.teachers.TeacherRule).

`level: label` (the default) exchanges label distributions (AnchorDistiller); `level: token`, among
clients of one tokenizer, next-token distributions top-k renormalised (TokenDistiller,
fedzero.distill.tokens): there `labels` are not used and `template` defaults to '{text}' (every
position of each anchor text is scored; a template with more around {text} frames the anchor as a
prompt and scores the position where its completion would begin).

Every client of a federation must use the same anchors, template and labels (the aggregator leaves
out predictions of other shapes). With `teacher: quality` or `only_stronger`, a client also reports
its quality with its predictions: its mean loss on its own held-out examples
(fedzero.client.local.mean_token_loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedzero.data import prompt_text
from fedzero.distill.distiller import AnchorDistiller
from fedzero.distill.teachers import LEVELS, TEACHERS, TeacherRule
from fedzero.distill.token_distiller import TokenDistiller
from fedzero.fields import from_known_fields


@dataclass
class DistillSettings:
    # required at level 'label' (the config reader and from_dict refuse their absence there)
    labels: list[str] = field(default_factory=list, metadata={"help": "the task's label words, in a fixed order (e.g. [negative, neutral, positive]); required at level 'label', unused at 'token'"})
    template: str = field(default="{text}", metadata={"help": "frames an anchor text as a task prompt; must contain {text} (e.g. 'Tweet: {text}\\nSentiment:'); required at level 'label'"})
    weight: float = field(default=1.0, metadata={"help": "lambda: weight of KL(teacher || model) in the loss"})
    anchors: int = field(default=64, metadata={"help": "how many anchor texts (the first of the anchor file) are scored and sent"})
    batch_size: int = field(default=4, metadata={"help": "anchors in the distillation term of one optimizer step"})
    anchor_file: str | None = field(default=None, metadata={"help": "JSONL of public texts ({'text': ...}); default: the bundled set"})
    max_chars: int | None = field(default=None, metadata={"help": "cut anchor texts to this many characters (None: prompts are cut to train.max_length tokens, keeping their end)"})
    teacher: str = field(default="mean", metadata={"help": f"how the others' predictions make a client's teacher: one of {list(TEACHERS)} ('quality' also weighs each by its held-out loss and its confidence per anchor; docs/method.md)"})
    only_stronger: bool = field(default=False, metadata={"help": "distil only from clients whose held-out loss is lower than one's own"})
    level: str = field(default="label", metadata={"help": f"what the clients exchange: one of {list(LEVELS)} ('label': label distributions, any vocabularies; 'token': next-token distributions, top_k renormalised, among clients of one tokenizer; docs/method.md)"})
    top_k: int = field(default=16, metadata={"help": "level 'token': how many most likely next tokens are sent per position (renormalised over them)"})

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"distill.level must be one of {list(LEVELS)}, got {self.level!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"distill.top_k must be an integer >= 1, got {self.top_k!r}")
        if self.level == "label" and (not isinstance(self.labels, list) or len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) \
                or not all(isinstance(x, str) and x for x in self.labels)):
            raise ValueError(f"distill.labels must list at least two distinct label words, got {self.labels!r}")
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise ValueError(f"distill.template must contain '{{text}}', got {self.template!r}")
        if not self.weight > 0 or int(self.anchors) < 1 or int(self.batch_size) < 1 \
                or (self.max_chars is not None and int(self.max_chars) < 1):
            raise ValueError("distill: weight must be > 0 and anchors, batch_size, max_chars >= 1")
        TeacherRule(self.teacher, self.only_stronger)    # refuses bad values: the aggregator's check too

    @property
    def teacher_rule(self) -> TeacherRule:
        return TeacherRule(self.teacher, self.only_stronger, self.level)

    @classmethod
    def from_dict(cls, data: dict) -> "DistillSettings":
        if not isinstance(data, dict):
            raise ValueError(f"distill: must be a mapping, got {type(data).__name__}")
        if data.get("level", "label") == "label" and ("labels" not in data or "template" not in data):
            raise ValueError("distill: needs 'labels' (the label words) and 'template' (a prompt with {text})")
        return from_known_fields(cls, data, "distill setting")

    @staticmethod
    def required_keys(data: dict) -> tuple[str, ...]:
        """The keys a `distill:` mapping must hold: labels and template at level 'label', none at 'token'."""
        return ("labels", "template") if data.get("level", "label") == "label" else ()

    def prompts(self, texts: list[str] | None = None) -> list[str]:
        """The first `anchors` anchor texts framed by the template: those of anchor_file, or of
        `texts` when given (the benchmark carves in-domain anchors from a corpus topic)."""
        from fedzero.adapters.dema.anchors import load_anchor_texts

        n = int(self.anchors)
        if texts is not None and len(texts) < n:
            raise ValueError(f"{len(texts)} anchor texts given; {n} are needed (distill.anchors)")
        texts = texts[:n] if texts is not None else load_anchor_texts(self.anchor_file, n, "distill.anchors")
        return [self.template.replace("{text}", prompt_text(t, self.max_chars)) for t in texts]

    def token_records(self, texts: list[str] | None = None) -> list[dict]:
        """Level 'token': the anchor records a TokenDistiller scores. Anchor texts (of anchor_file, or
        `texts`) framed by the template: with template '{text}' a text record (every position scored),
        else a prompt (the position after it scored). An anchor_file may also hold prompt/completion
        records: their prompts are framed by the template and their completion positions scored."""
        from fedzero.adapters.dema.anchors import DEFAULT_ANCHOR_FILE
        from fedzero.data import read_jsonl

        n = int(self.anchors)
        if texts is not None:
            if len(texts) < n:
                raise ValueError(f"{len(texts)} anchor texts given; {n} are needed (distill.anchors)")
            records = [{"text": t} for t in texts[:n]]
        else:
            path = self.anchor_file or DEFAULT_ANCHOR_FILE
            records = read_jsonl(path)
            if len(records) < n:
                raise ValueError(f"anchor file {path} has {len(records)} records; {n} are needed (distill.anchors)")
            records = records[:n]
        out = []
        for r in records:
            if "text" in r:
                text = prompt_text(r["text"], self.max_chars)
                out.append({"text": text} if self.template == "{text}"
                           else {"prompt": self.template.replace("{text}", text)})
            else:
                out.append({"prompt": self.template.replace("{text}", prompt_text(r["prompt"], self.max_chars)),
                            "completion": r["completion"]})
        return out

    def make_distiller(self, tokenizer, *, max_length: int, seed: int,
                       texts: list[str] | None = None) -> AnchorDistiller | TokenDistiller:
        if self.level == "token":
            distiller = TokenDistiller(tokenizer, self.token_records(texts), weight=self.weight,
                                       batch_size=int(self.batch_size), max_length=max_length, seed=seed,
                                       top_k=int(self.top_k))
            distiller.reports_quality = self.teacher_rule.needs_quality
            return distiller
        distiller = AnchorDistiller(tokenizer, self.prompts(texts), list(self.labels), weight=self.weight,
                                    batch_size=int(self.batch_size), max_length=max_length, seed=seed)
        distiller.reports_quality = self.teacher_rule.needs_quality
        return distiller
