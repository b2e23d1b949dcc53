"""A DPO policy's implicit reward as a preference model: ``beta * log(pi(y|x) / ref(y|x))``.

``hhrlhf dpo`` saves its policy with ``hhrlhf_pm.json`` (kind ``dpo``: the reference folder and
beta), so :func:`hhrlhf.pm.load` - and ``hhrlhf pm eval`` / ``pm score`` - load it beside the
neural and lexical PMs. The response is the dialogue's final Assistant turn (with the EOS the
policy was trained to end it with); a pair's two responses are read from one packed row
``[prompt, chosen, rejected]`` where the family packs exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.base import MARKER_FILE, PreferenceModel, write_marker
from hhrlhf.records import Comparison, Dialogue


class DPORewardModel(PreferenceModel):
    kind = "dpo"

    def __init__(self, policy: Any, reference: Any, beta: float, max_length: int,
                 reference_path: str):
        from hhrlhf.packing import packing_problem
        from hhrlhf.policy.encode import PolicyEncoder

        self.policy = policy
        self.reference = reference
        self.beta = float(beta)
        self.max_length = int(max_length)
        self.reference_path = reference_path
        self.encoder = PolicyEncoder(policy.tokenizer, self.max_length)
        self.packed = packing_problem(policy.config, self.max_length) is None and \
            packing_problem(reference.config, self.max_length) is None

    @classmethod
    def _load(cls, folder: Path) -> DPORewardModel:
        from hhrlhf.policy.model import Policy

        marker = json.loads((folder / MARKER_FILE).read_text())
        ref_path = marker.get("reference", "")
        if not ref_path:
            raise HHRLHFError("the DPO model names no reference policy", folder / MARKER_FILE)
        policy = Policy.load(folder)
        reference = Policy.load(ref_path, chat_format=None)  # reads the policy's token ids
        if torch.cuda.is_available():
            policy.net.to("cuda")
            reference.net.to("cuda")
        return cls(policy, reference, marker["beta"], marker["max_length"], ref_path)

    def save(self, path: str | Path) -> None:
        folder = Path(path)
        self.policy.save(folder)
        write_marker(folder, self.kind, reference=self.reference_path, beta=self.beta,
                     max_length=self.max_length)

    def _rewards(self, rows: Any, n: int, batch_size: int) -> np.ndarray:
        from hhrlhf.packing import collate_full, collate_shared
        from hhrlhf.pm.encode import sorted_batches
        from hhrlhf.policy.logprobs import response_logprobs

        out = np.zeros((len(rows), n), dtype=np.float64)
        lengths = rows.packed_lengths if self.packed else rows.full_lengths
        dev = next(self.policy.net.parameters()).device
        nets = (self.policy.net, self.reference.net)
        for net in nets:
            net.eval()
        with torch.inference_mode():
            for idx in sorted_batches(lengths, max(1, batch_size // n)):
                batch = (collate_shared if self.packed else collate_full)(
                    [rows.row(i) for i in idx], self.policy.pad_id)
                batch = {k: v.to(dev) for k, v in batch.items()}
                lp = response_logprobs(nets[0], batch, n)[0]
                ref = response_logprobs(nets[1], batch, n)[0]
                out[idx] = (self.beta * (lp - ref)).double().cpu().numpy()
        return out

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        rows = self.encoder.encode_responses(dialogues)
        return self._rewards(rows, 1, batch_size)[:, 0].astype(np.float32)

    def score_pairs(self, comparisons: Sequence[Comparison], batch_size: int = 32
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Pairs sharing their context in one packed row each; the rest dialogue by dialogue."""
        same = [i for i, c in enumerate(comparisons) if not (
            {"context_mismatch", "final_turn_not_assistant"} & c.flags)]
        other = [i for i in range(len(comparisons)) if i not in set(same)]
        chosen = np.zeros(len(comparisons), dtype=np.float32)
        rejected = np.zeros(len(comparisons), dtype=np.float32)
        if same:
            rows = self.encoder.encode_pairs([comparisons[i] for i in same])
            r = self._rewards(rows, 2, batch_size)
            chosen[same], rejected[same] = r[:, 0], r[:, 1]
        if other:
            chosen[other] = self.score([comparisons[i].chosen_dialogue for i in other],
                                       batch_size)
            rejected[other] = self.score([comparisons[i].rejected_dialogue for i in other],
                                         batch_size)
        return chosen, rejected
