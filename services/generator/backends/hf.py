"""Plain transformers/torch sampling backend: starts in seconds, for tests and laptops.

Sampling is a hand-written KV-cached decode loop so that (a) the log-probs are the raw
full-vocabulary values at the sampling temperature and (b) a weight swap can land between two
decode steps: every token records the version of the weights that produced it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpreg_core.config import HFBackendConfig, ModelConfig
from lpreg_core.devices import resolve_device, serving_dtype
from lpreg_core.weights import WeightManifest
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup
from services.generator.backends.base import SampledCompletion, SampleRequest, WeightsUnusable
from services.weight_sync import WeightReceiver


class HFBackend:
    def __init__(
        self, config: HFBackendConfig, model: ModelConfig, *, seed: int, dtype: str = "auto"
    ) -> None:
        self._config = config
        self._tokenizer = AutoTokenizer.from_pretrained(model.path)
        self._device = resolve_device(config.device, field="generator.backend.device")
        self._model = AutoModelForCausalLM.from_pretrained(
            model.path, dtype=serving_dtype(dtype, self._device)
        )
        self._model.to(self._device)  # type: ignore[arg-type]  # transformers' wrapper
        self._model.eval()
        self._generator = torch.Generator(self._device).manual_seed(seed)
        # Held for one decode step at a time, and by a weight swap: a swap waits for the current
        # step, never for a whole sequence.
        self._lock = threading.Lock()
        self._version = 0
        self._eos_id = self._tokenizer.eos_token_id
        self._pad_id = (
            self._tokenizer.pad_token_id
            if self._tokenizer.pad_token_id is not None
            else self._eos_id
        )
        self._receiver = WeightReceiver()
        # Gloo receives into host memory, NCCL straight into the model's GPU.
        self._receive_device = torch.device("cpu")
        self._rank: int | None = None
        # Set when a load stopped after writing some weights (a broadcast failure mid-publish, a
        # checksum mismatch found after the last bucket): the model is then neither version and
        # must not sample until a complete load replaces every parameter.
        self._poisoned: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    @property
    def version(self) -> int:
        return self._version

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_workers(self) -> int:
        return 1

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    @property
    def poisoned(self) -> str | None:
        """Why the weights are unusable (a load stopped half way), or None."""
        return self._poisoned

    @torch.no_grad()
    def generate(self, requests: list[SampleRequest]) -> list[list[SampledCompletion]]:
        if self._poisoned is not None:
            raise WeightsUnusable(f"the model's weights are unusable: {self._poisoned}")
        if not requests:
            return []
        temperature = requests[0].temperature
        max_new = max(r.max_new_tokens for r in requests)
        if any(r.temperature != temperature for r in requests):
            raise ValueError("one generate() call samples at one temperature")
        rows: list[tuple[int, list[int], int]] = []  # (request index, prompt, max_new_tokens)
        for i, r in enumerate(requests):
            rows.extend((i, r.prompt_token_ids, r.max_new_tokens) for _ in range(r.num_samples))
        out: list[list[SampledCompletion]] = [[] for _ in requests]
        for start in range(0, len(rows), self._config.max_batch_sequences):
            chunk = rows[start : start + self._config.max_batch_sequences]
            completions = self._sample_batch(
                [p for _, p, _ in chunk], [m for _, _, m in chunk], temperature, max_new
            )
            for (i, _, _), c in zip(chunk, completions, strict=True):
                out[i].append(c)
        return out

    def _sample_batch(
        self, prompts: list[list[int]], limits: list[int], temperature: float, max_new: int
    ) -> list[SampledCompletion]:
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding keeps the next position aligned
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        input_ids, attention = input_ids.to(self._device), attention.to(self._device)
        completions = [SampledCompletion() for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=self._device)
        limit = torch.tensor(limits)
        past = None
        step_ids = input_ids
        for _step in range(max_new):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            with self._lock:
                out = self._model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                version = self._version
            past = out.past_key_values
            logp = torch.log_softmax(out.logits[:, -1, :].float() / temperature, dim=-1)
            sampled = torch.multinomial(logp.exp(), 1, generator=self._generator).squeeze(-1)
            token_logp = logp.gather(-1, sampled[:, None]).squeeze(-1)
            for row in range(batch):
                if done[row]:
                    continue
                c = completions[row]
                tok = int(sampled[row])
                c.token_ids.append(tok)
                c.logprobs.append(float(token_logp[row]))
                c.versions.append(version)
                if tok == self._eos_id:
                    c.finished = True
                    done[row] = True
                elif len(c.token_ids) >= int(limit[row]):
                    done[row] = True
            if bool(done.all()):
                break
            step_ids = torch.where(done, torch.full_like(sampled, self._pad_id), sampled)[:, None]
            attention = torch.cat([attention, (~done).long()[:, None]], dim=1)
        return completions

    def _loadable(self) -> dict[str, torch.Tensor]:
        targets: dict[str, torch.Tensor] = dict(self._model.named_parameters())
        targets.update(self._model.named_buffers())
        return targets

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy each tensor into the model as it comes, then serve the weights as ``version``.

        Tensors may arrive in another dtype or on another device than the model's: the copy casts
        and moves them. Sampling waits while weights change (one lock, also held by each decode
        step). If anything fails after the first copy, the model is poisoned: ``generate``
        refuses until a later load replaces every parameter.
        """
        targets = self._loadable()
        parameters = {name for name, _ in self._model.named_parameters()}
        loaded: set[str] = set()
        with self._lock, torch.no_grad():
            try:
                for name, tensor in named_tensors:
                    target = targets.get(name)
                    if target is None:
                        raise KeyError(
                            f"weight {name!r} is not a parameter of the generator's model"
                        )
                    if target.shape != tensor.shape:
                        raise ValueError(
                            f"weight {name!r}: shape {tuple(tensor.shape)} != model's "
                            f"{tuple(target.shape)}"
                        )
                    target.copy_(tensor)
                    loaded.add(name)
            except BaseException as e:
                if loaded:
                    self._poisoned = (
                        f"loading v{version} stopped after {len(loaded)} tensors "
                        f"({type(e).__name__}: {e})"
                    )
                raise
            if self._poisoned is not None:
                if not parameters <= loaded:
                    missing = sorted(parameters - loaded)[:5]
                    raise RuntimeError(
                        f"v{version} did not replace every parameter of the poisoned model "
                        f"(e.g. {missing}); it stays unusable: {self._poisoned}"
                    )
                self._poisoned = None
            self._version = version

    def join_group(self, join: JoinGroup) -> None:
        receive_device = self._device if join.backend == "nccl" else torch.device("cpu")
        self._receiver.join(
            epoch=join.epoch,
            rank=join.rank_offset,
            world_size=join.world_size,
            store_host=join.store_host,
            store_port=join.store_port,
            backend=join.backend,
            timeout_s=join.timeout_s,
            device=receive_device,
            secret=join.secret,
        )
        self._receive_device = receive_device
        self._rank = join.rank_offset

    def update_weights(self, manifest: WeightManifest, timeout_s: float) -> str:
        """Receive the publish bucket by bucket, loading each bucket as it arrives.

        A publish whose names or shapes do not fit the model is received and discarded (the
        group stays in step) and refused before anything is written. A broadcast failure or a
        checksum mismatch after the first bucket leaves the model poisoned (see ``load_weights``).
        """
        targets = self._loadable()
        misfits = [
            f"{s.name} {s.shape}"
            for s in manifest.tensors
            if s.name not in targets or tuple(targets[s.name].shape) != s.shape
        ]
        if misfits:
            self._receiver.discard(manifest, timeout_s)
            raise ValueError(
                f"published weights v{manifest.version} do not fit the generator's model: "
                f"{misfits[:5]}{' ...' if len(misfits) > 5 else ''}"
            )
        with self._receiver.receive_buckets(manifest, self._receive_device, timeout_s) as stream:
            self.load_weights(stream, manifest.version)
        return manifest.checksum

    def leave_group(self) -> None:
        self._receiver.leave()
        self._rank = None

    def close(self) -> None:
        self.leave_group()
