"""Training losses of the hash encoders (paper: list-wise distillation + 0.1 bit balance + 0.1
quantization)."""

from __future__ import annotations

import torch


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the keys where ``mask`` is True; masked keys get ``0`` (not ``-inf``:
    ``-inf - -inf`` in a KL would poison the gradient, and masked keys are weighted out anyway)."""
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)


def row_kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the masked keys of each row, averaged over rows (log-probabilities from
    :func:`masked_log_softmax`, so that training computes each softmax once for both directions)."""
    return (log_p.exp() * mask * (log_p - log_q)).sum(-1).mean()


def listwise_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(P_student || P_teacher)`` over the keys of each row, averaged over rows.

    The direction is the paper's: the expectation is under the student, so the student is pushed to
    put its mass where the teacher has mass (mode seeking) rather than to cover every teacher key.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor[..., S], float
    mask : Tensor[..., S], bool -- keys that take part; every row needs at least one

    Returns
    -------
    Tensor[], float
    """
    return row_kl(masked_log_softmax(student_logits, mask), masked_log_softmax(teacher_logits, mask), mask)


def mass_covering_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(P_teacher || P_student)``, the other direction, added to the paper's loss in training.

    The paper's direction lets the student ignore a key the teacher attends to sharply, so long as
    the student puts little mass there: trained codes then missed the needle of a pass key in
    retrieval heads (pass key at a 5 % budget 6/10, random projection 9/10). This term makes missing
    a teacher mode expensive. Same arguments and masking as :func:`listwise_distillation`, which with
    the roles swapped computes exactly this.
    """
    return listwise_distillation(teacher_logits, student_logits, mask)


def bit_balance(codes: torch.Tensor) -> torch.Tensor:
    """Each bit should be +1 for half of the vectors: mean over bits of (mean over vectors)^2.

    Parameters
    ----------
    codes : Tensor[..., N, R], relaxed codes in ``[-1, 1]``
    """
    return codes.mean(-2).pow(2).mean()


def quantization(codes: torch.Tensor) -> torch.Tensor:
    """Distance of relaxed codes from ``+-1``: ``mean((|c| - 1)^2)``."""
    return (codes.abs() - 1).pow(2).mean()
