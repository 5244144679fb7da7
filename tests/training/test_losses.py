import math

import torch

from dashkv.training.losses import bit_balance, listwise_distillation, mass_covering_distillation, quantization


def test_distillation_is_kl_student_to_teacher():
    student = torch.tensor([[3.0, 0.0, -1.0, 5.0]])
    teacher = torch.tensor([[0.0, 0.5, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True, False]])
    ps = torch.softmax(student[:, :3], -1)
    pt = torch.softmax(teacher[:, :3], -1)
    expected = (ps * (ps.log() - pt.log())).sum()
    reverse = (pt * (pt.log() - ps.log())).sum()
    got = listwise_distillation(student, teacher, mask)
    torch.testing.assert_close(got, expected)
    assert not torch.isclose(got, reverse)  # the direction matters and is KL(P_s || P_t)
    assert listwise_distillation(teacher, teacher, mask).abs() < 1e-6


def test_mass_covering_term_is_kl_teacher_to_student_and_punishes_a_missed_mode():
    # the teacher gives a third of its mass to one key (a needle) and spreads the rest over 19 keys;
    # the student matches the spread keys and all but ignores the needle
    teacher = torch.zeros(1, 21)
    teacher[0, 0] = math.log(19 * 0.3 / 0.7)
    student = teacher.clone()
    student[0, 0] = -8.0
    mask = torch.ones(1, 21, dtype=torch.bool)
    mask[0, 20] = False
    pt, ps = torch.softmax(teacher[:, :20], -1), torch.softmax(student[:, :20], -1)
    got = mass_covering_distillation(student, teacher, mask)
    torch.testing.assert_close(got, (pt * (pt.log() - ps.log())).sum())
    assert got > 5 * listwise_distillation(student, teacher, mask)  # the paper's direction barely notices
    assert mass_covering_distillation(teacher, teacher, mask).abs() < 1e-6


def test_distillation_gradient_is_finite_with_masked_keys():
    student = torch.randn(3, 10, requires_grad=True)
    mask = torch.rand(3, 10) > 0.5
    mask[:, 0] = True
    listwise_distillation(student, torch.randn(3, 10), mask).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()


def test_bit_balance_gradient_pushes_bits_towards_zero_mean():
    codes = torch.full((8, 4), 0.5, requires_grad=True)  # every bit leans +1
    bit_balance(codes).backward()
    assert (codes.grad > 0).all()  # descending the gradient lowers the mean toward 0
    assert bit_balance(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])) == 0


def test_quantization_gradient_pushes_codes_to_plus_minus_one():
    codes = torch.tensor([0.3, -0.3, 1.0], requires_grad=True)
    quantization(codes).backward()
    assert codes.grad[0] < 0 and codes.grad[1] > 0  # away from 0, toward +-1
    assert codes.grad[2] == 0
