"""The LightningDataModule: load, tokenise, validate, pad stochastically,
group by length and collate for the objective of the current training stage.
"""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pdlightning.data.collate import (
    MODES,
    PLANNED_LAYOUT,
    Batch,
    Mode,
    add_stochastic_pads,
    collate,
    example_rng,
)
from pdlightning.data.preprocess import LayoutOptions, preprocess_row
from pdlightning.data.sources import LOCAL_SUFFIXES, bundled_files, load_rows
from pdlightning.tags import TagSpec
from pdlightning.tokenizer import (
    TOKENIZER_VERSION,
    add_control_tokens,
    build_tokenizer,
    load_spec,
    save_spec,
)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data a config selects cannot train: the config's fault, found once the data
    is read (inside ``fit``), and reported by the CLI as one line, not a traceback."""


@dataclass
class Stage:
    """One training stage: the objective's layout and how many epochs it lasts.

    ``epochs=None`` means until the end of training. ``ar_fraction`` (``planned``
    stages only) lays that fraction of the stage's examples out as ``planned_ar``
    instead, drawn afresh per example and epoch: the planned objective with
    next-token prediction on some spans mixed in.
    """

    mode: Mode = "planned"
    epochs: int | None = None
    ar_fraction: float = 0.0


class PromptRows(Dataset):
    """The prompts of a split, one row at a time (for ``predict``)."""

    def __init__(self, rows: Any) -> None:
        keep = [c for c in ("prompt", "prompt_ids", "answer_keys") if c in rows.column_names]
        self.rows = rows.select_columns(keep)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {"index": i, "prompt": row.get("prompt"), "prompt_ids": row["prompt_ids"],
                "answer_keys": row.get("answer_keys")}


class Example(NamedTuple):
    """One training example: prompt and response ids, and whether its spans train
    autoregressively (a ``planned_ar`` row; see :class:`Stage`)."""

    prompt_ids: list[int]
    response: list[int]
    causal: bool = False


class ExampleDataset(Dataset):
    """Tokenised examples laid out for one mode; pads redrawn for every epoch.

    Rows are read one at a time, so a hub-sized split is never held as Python
    lists; :meth:`lengths` reads the token counts from Arrow without the tokens.
    """

    def __init__(
        self, rows: Any, spec: TagSpec, mode: Mode, max_pads: int, seed: int, epoch: int = 0,
        ar_fraction: float = 0.0,
    ) -> None:
        self.column = "planned_ids" if mode in PLANNED_LAYOUT else "plain_ids"
        self.rows = rows.select_columns(["prompt_ids", self.column])
        self.spec, self.mode, self.max_pads, self.seed, self.epoch = spec, mode, max_pads, seed, epoch
        self.ar_fraction = ar_fraction

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[i]
        response = row[self.column]
        if self.mode in PLANNED_LAYOUT:
            response = add_stochastic_pads(response, self.spec, example_rng(self.seed, self.epoch, i), self.max_pads)
        causal = self.mode == "planned_ar" or (
            self.ar_fraction > 0 and random.Random(f"{self.seed}:{self.epoch}:{i}:ar").random() < self.ar_fraction
        )
        return Example(row["prompt_ids"], response, causal)

    def lengths(self) -> list[int]:
        """Every example's length before padding (for grouping)."""
        import pyarrow.compute as pc

        table = self.rows.with_format("arrow")[:]
        prompt = pc.list_value_length(table["prompt_ids"])
        return pc.add(prompt, pc.list_value_length(table[self.column])).to_pylist()


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length: shuffle, sort within chunks of 50 batches, shuffle batches.

    Under data parallelism the sampler forms *global* batches of
    ``batch_size * world_size`` and yields this rank's slice of each, so the
    ranks together see exactly the batches one process would. Training drops a
    short global batch; evaluation (``shuffle=False``) deals it out over the
    ranks instead, so every row is scored once and a split smaller than one
    global batch still validates (a rank left without a row repeats one).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(f"group:{self.seed}:{self.epoch}")
        size = self.batch_size * self.world_size
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        chunk = size * 50
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i])
            batches += [part[k : k + size] for k in range(0, len(part), size)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and self.shuffle:  # training: every rank a full slice, so drop short ones
            batches = [b for b in batches if len(b) == size]
        return batches

    def _slice(self, batch: list[int]) -> list[int]:
        """This rank's part of a global batch."""
        if len(batch) == self.batch_size * self.world_size:
            lo = self.rank * self.batch_size
            return batch[lo : lo + self.batch_size]
        # a short one (evaluation only): dealt out, a row repeated where the ranks outnumber the rows
        return batch[self.rank :: self.world_size] or [batch[self.rank % len(batch)]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([self._slice(b) for b in self._global_batches()])

    def __len__(self) -> int:
        return len(self._global_batches())


def _check_source(source: str) -> None:
    """Refuse a local file or folder that is not there, before a backbone loads: a
    source that names a data file (by suffix) or starts like a path is not a hub name."""
    path = Path(source).expanduser()
    looks_local = path.suffix in LOCAL_SUFFIXES or source.startswith(("/", "./", "../", "~"))
    if source != "bundled" and looks_local and not path.exists():
        raise ValueError(f"data.source: {source!r} does not exist (a local .json, .jsonl or .parquet file or "
                         "folder, a datasets hub name such as Open-Orca/SlimOrca, or bundled)")


class PlannedDataModule(L.LightningDataModule):
    """Data for planned diffusion and its baselines.

    Args:
        source: ``bundled`` (generated verifiable set), a local JSON/JSONL/Parquet
            file or folder, or a ``datasets`` hub name (e.g. ``Open-Orca/SlimOrca``).
        tokenizer_path: Local tokenizer directory (a pretrained backbone's); None
            trains one on the training split (bundled set) and caches it.
        trust_remote_code: Allow the tokenizer's own code (linked from
            ``model.backbone.trust_remote_code`` on the command line: one switch).
        vocab_size: Size of a tokenizer trained here.
        tag_preset: ``paper`` or ``official`` control strings.
        length_unit: Tokens per planned length unit.
        cache_dir: Generated files, tokenizer and ``datasets`` cache.
        bundled_sizes: Split sizes of the bundled set.
        seed: Seed of generation, padding and batching.
        stages: Training stages in order, e.g. an ``autoregressive`` warm-up then ``planned``.
        dense: Dense hybrid attention (PD-DA).
        topic_heads: Spans open with their topic words.
        keep_sync: False = the no-``<sync/>`` ablation.
        keep_topics: False = the no-topic ablation.
        max_pads: Most stochastic pads per span (0 disables padding).
        max_length: Longest prompt + response.
        overflow: ``drop`` or ``cut`` over-long rows (cut at a round boundary).
        batch_size: Examples per batch.
        length_grouped: Group training batches by length.
        num_workers: DataLoader workers.
        num_proc: Processes that tokenise the rows once (``datasets`` ``map``;
            None = this one). Worth the CPU count for a large set: one process
            does about 300 bundled rows a second, so SlimOrca's 518k longer
            rows take half an hour or more.
        validation_fraction: Held-out fraction for sources with one split.
        limit_train: Use only the first N training rows (smoke runs).
    """

    def __init__(
        self,
        source: str = "bundled",
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        vocab_size: int = 2048,
        tag_preset: str = "paper",
        length_unit: int = 10,
        cache_dir: str = ".cache/pdlightning",
        bundled_sizes: dict[str, int] | None = None,
        seed: int = 0,
        stages: list[Stage] | None = None,
        dense: bool = False,
        topic_heads: bool = True,
        keep_sync: bool = True,
        keep_topics: bool = True,
        max_pads: int = 10,
        max_length: int = 1024,
        overflow: str = "drop",
        batch_size: int = 16,
        length_grouped: bool = True,
        num_workers: int = 0,
        num_proc: int | None = None,
        validation_fraction: float = 0.02,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        self.stages = list(stages) if stages else [Stage("planned", None)]
        for st in self.stages:
            if st.mode not in MODES:
                raise ValueError(f"stage mode {st.mode!r} is not one of {MODES}")
            if not 0.0 <= st.ar_fraction <= 1.0:
                raise ValueError(f"stage ar_fraction must lie in [0, 1], got {st.ar_fraction}")
            if st.ar_fraction and st.mode != "planned":
                raise ValueError(f"stage ar_fraction mixes planned_ar rows into a planned stage; "
                                 f"this stage's mode is {st.mode!r}")
        if overflow not in ("drop", "cut"):
            raise ValueError(f"overflow must be 'drop' or 'cut', got {overflow!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("max_pads", max_pads, 0),
                                 ("max_length", max_length, 1), ("num_workers", num_workers, 0),
                                 ("num_proc", 1 if num_proc is None else num_proc, 1)):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        _check_source(source)
        self.source, self.cache_dir, self.seed = source, cache_dir, seed
        self.trust_remote_code = trust_remote_code
        self.bundled_sizes = bundled_sizes
        self.dense, self.batch_size, self.length_grouped = dense, batch_size, length_grouped
        self.num_workers, self.validation_fraction, self.limit_train = num_workers, validation_fraction, limit_train
        self.num_proc = num_proc
        self.options = LayoutOptions(
            topic_heads=topic_heads, keep_sync=keep_sync, keep_topics=keep_topics,
            max_pads=max_pads, max_length=max_length, overflow=overflow,
        )
        base_spec = TagSpec.preset(tag_preset, length_unit=length_unit)
        self.tokenizer, self.spec = self._tokenizer(tokenizer_path, base_spec, vocab_size)
        self.splits: dict[str, Any] = {}
        self.discarded: dict[str, Counter[str]] = {}
        self._lengths: dict[tuple[str, str], list[int]] = {}

    # ------------------------------------------------------------------ set-up

    def _tokenizer(self, path: str | None, spec: TagSpec, vocab_size: int) -> tuple[Any, TagSpec]:
        if path is not None:  # loaded as every decoder loads it: checked, and as saved
            from pdlightning.tokenizer import load_tokenizer

            if not Path(path).is_dir():
                raise ValueError(f"data.tokenizer_path: {path!r} is not a directory (a local model's, with its "
                                 "tokenizer files)")
            try:
                tok = load_tokenizer(path, trust_remote_code=self.trust_remote_code)
            except FileNotFoundError as e:
                raise ValueError(f"data.tokenizer_path: {e}") from None
            return tok, add_control_tokens(tok, spec)
        if self.source != "bundled":
            raise ValueError("a tokenizer path is required for sources other than 'bundled'")
        from transformers import PreTrainedTokenizerFast

        files = bundled_files(self.cache_dir, self.bundled_sizes, self.seed, spec)
        preset = "".join(c for c in spec.plan_open if c.isalnum())
        directory = Path(files["train"]).parent / f"tokenizer-v{TOKENIZER_VERSION}-{preset}-{spec.length_unit}-{vocab_size}"
        if (directory / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(directory), load_spec(directory)
        rows = load_rows("bundled", self.cache_dir, self.bundled_sizes, self.seed, spec=spec)["train"]
        texts = (f"{r['prompt']}\n{r['response']}" for r in rows)
        tok, spec = build_tokenizer(texts, spec, vocab_size=vocab_size)
        directory.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(directory)
        save_spec(spec, directory)
        return tok, spec

    def _fingerprint(self, ds: Any) -> str:
        """Cache key of the tokenised split: input rows, tokenizer, tag spec, layout options.

        ``datasets`` cannot hash a tokenizer object reproducibly, so the key is
        built here from what determines the result.
        """
        import hashlib
        import inspect

        from pdlightning.data import preprocess

        h = hashlib.sha256()
        for part in (
            ds._fingerprint,
            self.tokenizer.backend_tokenizer.to_str() if hasattr(self.tokenizer, "backend_tokenizer") else repr(self.tokenizer),
            getattr(self.tokenizer, "chat_template", None),
            repr(sorted(self.spec.strings().items())), repr(sorted(self.spec.ids.items())), repr(self.options),
            inspect.getsource(preprocess),
        ):
            h.update(str(part).encode())
        return h.hexdigest()[:32]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def prepare_data(self) -> None:
        load_rows(self.source, self.cache_dir, self.bundled_sizes, self.seed, self.validation_fraction, self.spec)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = load_rows(self.source, self.cache_dir, self.bundled_sizes, self.seed, self.validation_fraction, self.spec)
        fn = functools.partial(preprocess_row, tokenizer=self.tokenizer, spec=self.spec, options=self.options)
        for name, ds in raw.items():
            if name == "train" and self.limit_train:
                ds = ds.select(range(min(self.limit_train, len(ds))))
            done = ds.map(fn, desc=f"tokenising {name}", new_fingerprint=self._fingerprint(ds),
                          num_proc=self.num_proc if self.num_proc and len(ds) > self.num_proc else None)
            reasons = Counter(e for e in done["error"] if e is not None)
            self.discarded[name] = reasons
            if reasons:
                log.warning("%s: discarded %d of %d rows: %s", name, sum(reasons.values()), len(done), dict(reasons))
            self.splits[name] = done.filter(lambda e: e is None, input_columns="error")
            if name == "train" and len(done) and not len(self.splits[name]):
                fixes = []
                if reasons.get("too_long"):
                    fixes.append("too_long: raise data.max_length or set data.overflow: cut")
                if reasons.get("bad_row"):
                    fixes.append("bad_row: a row needs a prompt ('prompt' or 'instruction') and an answer "
                                 "('response', 'completion', 'output' or 'tagged'), or SlimOrca 'conversations' "
                                 "with human and gpt turns")
                raise DataError(f"data: all {len(done)} training rows were discarded ({dict(reasons)}); "
                                + "; ".join(fixes or ["see the warnings above for the first rows' reasons"]))

    # ------------------------------------------------------------------ loaders

    def stage_at(self, epoch: int) -> Stage:
        """The stage that trains epoch ``epoch`` (0-based)."""
        start = 0
        for st in self.stages:
            if st.epochs is None or epoch < start + st.epochs:
                return st
            start += st.epochs
        return self.stages[-1]

    def stage_starts(self) -> list[int]:
        """First epoch of every stage."""
        starts, start = [], 0
        for st in self.stages:
            starts.append(start)
            start += st.epochs or 0
        return starts

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def dataset(self, split: str, mode: Mode, epoch: int = 0, ar_fraction: float = 0.0) -> ExampleDataset:
        self.setup()
        if split not in self.splits:
            raise KeyError(f"no {split!r} split in {self.source!r}; have {sorted(self.splits)}")
        return ExampleDataset(
            self.splits[split], self.spec, mode, self.options.max_pads, self.seed, epoch, ar_fraction
        )

    def collate_fn(self, mode: Mode) -> Any:
        def fn(items: list[Example]) -> Batch:
            prompts, responses, causal = zip(*items, strict=True)
            return collate(prompts, responses, self.spec, mode=mode, dense=self.dense,
                           causal_rows=causal if mode == "planned" and any(causal) else None)

        return fn

    def _loader(self, split: str, mode: Mode, epoch: int, train: bool, ar_fraction: float = 0.0) -> DataLoader:
        ds = self.dataset(split, mode, epoch, ar_fraction)
        grouped = self.length_grouped or not train
        if grouped and (split, mode) not in self._lengths:  # the same every epoch: pads come later
            self._lengths[(split, mode)] = ds.lengths()
        lengths = self._lengths[(split, mode)] if grouped else [0] * len(ds)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed, epoch, train, rank, world)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=self.collate_fn(mode), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        epoch = self._current_epoch()
        stage = self.stage_at(epoch)
        return self._loader("train", stage.mode, epoch, train=True, ar_fraction=stage.ar_fraction)

    def val_dataloader(self) -> DataLoader:
        """While fitting, the current stage's layout; otherwise (``pdlightning validate``
        of a checkpoint) the last stage's, the objective the model finished with."""
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and getattr(trainer.state.fn, "value", None) == "fit"
        mode = self.stage_at(self._current_epoch()).mode if fitting else self.stages[-1].mode
        return self._loader("validation", mode, 0, train=False)

    def _test_split(self) -> str:
        return "test" if "test" in self.splits or not self.splits else "validation"

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_split(), self.stages[-1].mode, 0, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split's prompts (``validation`` where a source has no test split), in
        order, as rows of ``index``, ``prompt``, ``prompt_ids`` and ``answer_keys`` (None
        where the source has none), for the module's ``predict_step`` to decode."""
        self.setup()
        return DataLoader(PromptRows(self.splits[self._test_split()]), batch_size=self.batch_size,
                          collate_fn=list, num_workers=self.num_workers)

    def rows(self, split: str) -> Any:
        """The processed rows of a split (prompt, response, answer keys...)."""
        self.setup()
        return self.splits[split]

    def state_summary(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "discarded": {k: dict(v) for k, v in self.discarded.items()}}


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    return batch.to(device)
