"""torch.nn module classes built with non-default constructor arguments, and inputs for each.

Each case is ``(id, build, inputs)``: ``build()`` returns the module (in train mode, as users hold them)
and ``inputs()`` a tuple of tensors. Seeds are set by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Case = tuple[str, Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape).to(dtype),)


def _pair(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape), torch.randn(*shape))


def _cls(n: int, c: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(n, c), torch.randint(0, c, (n,)))


def _tied_sequential() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    return model


def _tied_bf16() -> nn.Module:
    emb, head = nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, head).to(torch.bfloat16)


def _frozen_embedding() -> nn.Module:
    return nn.Embedding.from_pretrained(torch.randn(7, 4), freeze=True, padding_idx=1, max_norm=None)


def _partly_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(approximate="tanh"), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    return model


def _bn_float64() -> nn.Module:
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=0.3).double()
    bn(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    return bn


CASES: list[Case] = [
    ("Linear", lambda: nn.Linear(5, 3, bias=False), _x(2, 5)),
    ("Bilinear", lambda: nn.Bilinear(3, 4, 2, bias=False), lambda: (torch.randn(2, 3), torch.randn(2, 4))),
    ("Identity", lambda: nn.Identity(3, unused=1), _x(2, 3)),
    ("Conv1d", lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2, bias=False,
                                 padding_mode="reflect"), _x(1, 2, 9)),
    ("Conv2d", lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding="same" if False else 1,
                                 padding_mode="circular"), _x(1, 2, 7, 6)),
    ("Conv3d", lambda: nn.Conv3d(1, 2, 2, stride=1, padding=0, bias=False), _x(1, 1, 4, 4, 4)),
    ("ConvTranspose1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1, groups=1), _x(1, 2, 5)),
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, dilation=1, bias=False), _x(1, 2, 3, 3)),
    ("ConvTranspose3d", lambda: nn.ConvTranspose3d(1, 2, 2, stride=1), _x(1, 1, 3, 3, 3)),
    ("Fold", lambda: nn.Fold(output_size=(4, 5), kernel_size=2, stride=1), _x(1, 12, 12)),
    ("Unfold", lambda: nn.Unfold(kernel_size=2, dilation=1, padding=1, stride=2), _x(1, 3, 4, 4)),
    ("MaxPool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), _x(1, 2, 9)),
    ("MaxPool2d", lambda: nn.MaxPool2d(2, stride=1, dilation=2), _x(1, 2, 6, 6)),
    ("MaxPool3d", lambda: nn.MaxPool3d(2, stride=2, ceil_mode=True), _x(1, 1, 5, 5, 5)),
    ("AvgPool1d", lambda: nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False), _x(1, 2, 8)),
    ("AvgPool2d", lambda: nn.AvgPool2d(2, stride=1, ceil_mode=True, divisor_override=3), _x(1, 2, 5, 5)),
    ("AvgPool3d", lambda: nn.AvgPool3d(2, stride=1, count_include_pad=False), _x(1, 1, 4, 4, 4)),
    ("LPPool1d", lambda: nn.LPPool1d(3, 2, stride=1), _x(1, 2, 8)),
    ("LPPool2d", lambda: nn.LPPool2d(1.5, 2, ceil_mode=True), _x(1, 2, 5, 5)),
    ("AdaptiveAvgPool1d", lambda: nn.AdaptiveAvgPool1d(3), _x(1, 2, 8)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((2, None)), _x(1, 2, 6, 5)),
    ("AdaptiveAvgPool3d", lambda: nn.AdaptiveAvgPool3d(2), _x(1, 1, 4, 4, 4)),
    ("AdaptiveMaxPool1d", lambda: nn.AdaptiveMaxPool1d(3), _x(1, 2, 8)),
    ("AdaptiveMaxPool2d", lambda: nn.AdaptiveMaxPool2d(2), _x(1, 2, 6, 5)),
    ("AdaptiveMaxPool3d", lambda: nn.AdaptiveMaxPool3d((1, 2, 2)), _x(1, 1, 4, 4, 4)),
    ("ReflectionPad1d", lambda: nn.ReflectionPad1d((1, 2)), _x(1, 2, 5)),
    ("ReflectionPad2d", lambda: nn.ReflectionPad2d(1), _x(1, 1, 4, 4)),
    ("ReplicationPad2d", lambda: nn.ReplicationPad2d((1, 0, 2, 1)), _x(1, 1, 3, 3)),
    ("ReplicationPad3d", lambda: nn.ReplicationPad3d(1), _x(1, 1, 2, 2, 2)),
    ("ZeroPad2d", lambda: nn.ZeroPad2d((1, 1, 0, 2)), _x(1, 1, 3, 3)),
    ("ConstantPad1d", lambda: nn.ConstantPad1d(2, 3.5), _x(1, 2, 3)),
    ("ConstantPad3d", lambda: nn.ConstantPad3d((1, 0, 0, 1, 1, 0), -1.0), _x(1, 1, 2, 2, 2)),
    ("CircularPad2d", lambda: nn.CircularPad2d(1), _x(1, 1, 3, 3)),
    ("ELU", lambda: nn.ELU(alpha=0.5), _x(2, 4)),
    ("Hardshrink", lambda: nn.Hardshrink(lambd=0.3), _x(2, 4)),
    ("Hardtanh", lambda: nn.Hardtanh(min_val=-0.5, max_val=0.7), _x(2, 4)),
    ("LeakyReLU", lambda: nn.LeakyReLU(negative_slope=0.2), _x(2, 4)),
    ("LogSigmoid", lambda: nn.LogSigmoid(), _x(2, 4)),
    ("PReLU", lambda: nn.PReLU(num_parameters=3, init=0.1), _x(2, 3)),
    ("ReLU6", lambda: nn.ReLU6(), _x(2, 4)),
    ("RReLU", lambda: nn.RReLU(lower=0.1, upper=0.2), _x(2, 4)),
    ("SELU", lambda: nn.SELU(), _x(2, 4)),
    ("CELU", lambda: nn.CELU(alpha=2.0), _x(2, 4)),
    ("GELU", lambda: nn.GELU(approximate="tanh"), _x(2, 4)),
    ("SiLU", lambda: nn.SiLU(), _x(2, 4)),
    ("Mish", lambda: nn.Mish(), _x(2, 4)),
    ("Softplus", lambda: nn.Softplus(beta=2.0, threshold=5.0), _x(2, 4)),
    ("Softshrink", lambda: nn.Softshrink(lambd=0.2), _x(2, 4)),
    ("Threshold", lambda: nn.Threshold(0.1, -2.0), _x(2, 4)),
    ("GLU", lambda: nn.GLU(dim=0), _x(4, 3)),
    ("Softmin", lambda: nn.Softmin(dim=0), _x(3, 4)),
    ("Softmax", lambda: nn.Softmax(dim=0), _x(3, 4)),
    ("LogSoftmax", lambda: nn.LogSoftmax(dim=0), _x(3, 4)),
    ("Softmax2d", lambda: nn.Softmax2d(), _x(1, 2, 3, 3)),
    ("Hardsigmoid", lambda: nn.Hardsigmoid(), _x(2, 4)),
    ("Hardswish", lambda: nn.Hardswish(), _x(2, 4)),
    ("Tanhshrink", lambda: nn.Tanhshrink(), _x(2, 4)),
    ("Softsign", lambda: nn.Softsign(), _x(2, 4)),
    ("MultiheadAttention", lambda: nn.MultiheadAttention(8, 2, dropout=0.1, bias=False, add_bias_kv=True,
                                                         add_zero_attn=True, kdim=5, vdim=6, batch_first=True),
     lambda: (torch.randn(1, 3, 8), torch.randn(1, 4, 5), torch.randn(1, 4, 6))),
    ("BatchNorm1d", lambda: nn.BatchNorm1d(3, eps=1e-3, momentum=0.2, affine=False), _x(4, 3)),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(2, track_running_stats=False), _x(2, 2, 3, 3)),
    ("BatchNorm3d", lambda: nn.BatchNorm3d(2, momentum=None), _x(2, 2, 2, 2, 2)),
    ("BatchNorm1d-float64", _bn_float64, _x(4, 3, dtype=torch.float64)),
    ("InstanceNorm1d", lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True), _x(2, 3, 5)),
    ("InstanceNorm2d", lambda: nn.InstanceNorm2d(2, eps=1e-3), _x(1, 2, 4, 4)),
    ("InstanceNorm3d", lambda: nn.InstanceNorm3d(1, affine=True), _x(1, 1, 3, 3, 3)),
    ("GroupNorm", lambda: nn.GroupNorm(2, 4, eps=1e-3, affine=False), _x(2, 4, 3)),
    ("LayerNorm", lambda: nn.LayerNorm((3, 4), eps=1e-3, elementwise_affine=True, bias=False), _x(2, 3, 4)),
    ("RMSNorm", lambda: nn.RMSNorm(4, eps=1e-4, elementwise_affine=False), _x(2, 4)),
    ("LocalResponseNorm", lambda: nn.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=2.0), _x(1, 4, 3, 3)),
    ("CrossMapLRN2d", lambda: nn.CrossMapLRN2d(3, alpha=1e-3, beta=0.5, k=2), _x(1, 4, 3, 3)),
    ("RNN", lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bias=False, batch_first=True,
                           dropout=0.1, bidirectional=True), _x(1, 5, 3)),
    ("LSTM", lambda: nn.LSTM(3, 4, num_layers=1, proj_size=2, batch_first=True), _x(1, 5, 3)),
    ("GRU", lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True), _x(5, 1, 3)),
    ("RNNCell", lambda: nn.RNNCell(3, 4, bias=False, nonlinearity="relu"), _x(2, 3)),
    ("LSTMCell", lambda: nn.LSTMCell(3, 4, bias=False), _x(2, 3)),
    ("GRUCell", lambda: nn.GRUCell(3, 4), _x(2, 3)),
    ("TransformerEncoderLayer", lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                                                   batch_first=True, norm_first=True, bias=False),
     _x(1, 3, 8)),
    ("TransformerDecoderLayer", lambda: nn.TransformerDecoderLayer(8, 2, 12, activation=F.gelu, layer_norm_eps=1e-3),
     lambda: (torch.randn(3, 1, 8), torch.randn(4, 1, 8))),
    ("TransformerEncoder", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, norm=nn.LayerNorm(8), enable_nested_tensor=False),
     _x(1, 3, 8)),
    ("TransformerDecoder", lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16), 2, norm=nn.LayerNorm(8)),
     lambda: (torch.randn(3, 1, 8), torch.randn(4, 1, 8))),
    ("Transformer", lambda: nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                                           dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True, bias=False),
     lambda: (torch.randn(1, 3, 8), torch.randn(1, 2, 8))),
    ("Embedding", lambda: nn.Embedding(10, 3, padding_idx=0, max_norm=None, scale_grad_by_freq=True),
     lambda: (torch.tensor([[1, 0, 4]]),)),
    ("Embedding-frozen", _frozen_embedding, lambda: (torch.tensor([1, 2, 6]),)),
    ("EmbeddingBag", lambda: nn.EmbeddingBag(10, 3, mode="max", padding_idx=2),
     lambda: (torch.tensor([[1, 2, 4], [4, 3, 9]]),)),
    ("CosineSimilarity", lambda: nn.CosineSimilarity(dim=0, eps=1e-6), _pair(3, 4)),
    ("PairwiseDistance", lambda: nn.PairwiseDistance(p=1.0, eps=1e-4, keepdim=True), _pair(3, 4)),
    ("Dropout", lambda: nn.Dropout(p=0.3), _x(2, 4)),
    ("Dropout1d", lambda: nn.Dropout1d(p=0.2), _x(2, 3, 4)),
    ("Dropout2d", lambda: nn.Dropout2d(p=0.2), _x(1, 2, 3, 3)),
    ("Dropout3d", lambda: nn.Dropout3d(p=0.2), _x(1, 2, 2, 2, 2)),
    ("AlphaDropout", lambda: nn.AlphaDropout(p=0.2), _x(2, 4)),
    ("FeatureAlphaDropout", lambda: nn.FeatureAlphaDropout(p=0.2), _x(1, 2, 3, 3)),
    ("Flatten", lambda: nn.Flatten(start_dim=0, end_dim=1), _x(2, 3, 4)),
    ("Unflatten", lambda: nn.Unflatten(1, (2, 2)), _x(3, 4)),
    ("PixelShuffle", lambda: nn.PixelShuffle(2), _x(1, 4, 2, 2)),
    ("PixelUnshuffle", lambda: nn.PixelUnshuffle(2), _x(1, 1, 4, 4)),
    ("ChannelShuffle", lambda: nn.ChannelShuffle(2), _x(1, 4, 2, 2)),
    ("Upsample", lambda: nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True), _x(1, 1, 3, 3)),
    ("UpsamplingNearest2d", lambda: nn.UpsamplingNearest2d(size=(4, 5)), _x(1, 1, 2, 2)),
    ("UpsamplingBilinear2d", lambda: nn.UpsamplingBilinear2d(scale_factor=2), _x(1, 1, 2, 2)),
    ("FractionalMaxPool2d", lambda: nn.FractionalMaxPool2d(2, output_ratio=0.5, return_indices=False), _x(1, 1, 6, 6)),
    ("MaxUnpool1d", lambda: nn.MaxUnpool1d(2, stride=2), lambda: (torch.randn(1, 1, 3), torch.tensor([[[0, 3, 4]]]))),
    ("L1Loss", lambda: nn.L1Loss(reduction="sum"), _pair(3, 4)),
    ("MSELoss", lambda: nn.MSELoss(reduction="none"), _pair(3, 4)),
    ("HuberLoss", lambda: nn.HuberLoss(reduction="sum", delta=0.5), _pair(3, 4)),
    ("SmoothL1Loss", lambda: nn.SmoothL1Loss(beta=0.5), _pair(3, 4)),
    ("SoftMarginLoss", lambda: nn.SoftMarginLoss(reduction="sum"), _pair(3, 4)),
    ("KLDivLoss", lambda: nn.KLDivLoss(reduction="batchmean", log_target=True), _pair(3, 4)),
    ("BCEWithLogitsLoss", lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 0.5, 1.5])),
     lambda: (torch.randn(3, 4), torch.rand(3, 4))),
    ("BCELoss", lambda: nn.BCELoss(weight=torch.rand(4), reduction="sum"),
     lambda: (torch.rand(3, 4), torch.rand(3, 4))),
    ("CrossEntropyLoss", lambda: nn.CrossEntropyLoss(weight=torch.rand(5), ignore_index=2, label_smoothing=0.1),
     _cls(4, 5)),
    ("NLLLoss", lambda: nn.NLLLoss(reduction="sum", ignore_index=1), _cls(4, 5)),
    ("MultiMarginLoss", lambda: nn.MultiMarginLoss(p=2, margin=0.5), _cls(4, 5)),
    ("CosineEmbeddingLoss", lambda: nn.CosineEmbeddingLoss(margin=0.2, reduction="sum"),
     lambda: (torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1.0, -1.0, 1.0]))),
    ("MarginRankingLoss", lambda: nn.MarginRankingLoss(margin=0.3),
     lambda: (torch.randn(3), torch.randn(3), torch.tensor([1.0, -1.0, 1.0]))),
    ("HingeEmbeddingLoss", lambda: nn.HingeEmbeddingLoss(margin=2.0),
     lambda: (torch.randn(3, 4), torch.ones(3, 4))),
    ("GaussianNLLLoss", lambda: nn.GaussianNLLLoss(full=True, eps=1e-4),
     lambda: (torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 4) + 0.1)),
    ("PoissonNLLLoss", lambda: nn.PoissonNLLLoss(log_input=False, full=True),
     lambda: (torch.rand(3, 4), torch.rand(3, 4))),
    ("TripletMarginLoss", lambda: nn.TripletMarginLoss(margin=0.5, p=1.0, swap=True), lambda: (torch.randn(3, 4),) * 3),
    ("TripletMarginWithDistanceLoss", lambda: nn.TripletMarginWithDistanceLoss(
        distance_function=nn.PairwiseDistance(p=1.0), margin=2.0, swap=True), lambda: (torch.randn(3, 4),) * 3),
    ("TripletMarginWithDistanceLoss-fn", lambda: nn.TripletMarginWithDistanceLoss(
        distance_function=F.cosine_similarity, reduction="sum"), lambda: (torch.randn(3, 4),) * 3),
    ("AdaptiveLogSoftmaxWithLoss", lambda: nn.AdaptiveLogSoftmaxWithLoss(8, 10, [3, 6], div_value=2.0, head_bias=True),
     lambda: (torch.randn(4, 8), torch.tensor([0, 4, 7, 9]))),
    ("Sequential-tied", _tied_sequential, _x(2, 6)),
    ("Sequential-tied-bfloat16", _tied_bf16, lambda: (torch.tensor([[1, 2, 11]]),)),
    ("Sequential-partly-frozen", _partly_frozen, _x(2, 4)),
    ("ModuleDict-Sequential", lambda: nn.Sequential(OrderedDict_(a=nn.Linear(3, 3), b=nn.Softplus(beta=3.0))),
     _x(2, 3)),
    ("Linear-bfloat16", lambda: nn.Linear(4, 3).to(torch.bfloat16), _x(2, 4, dtype=torch.bfloat16)),
    ("Conv1d-float16", lambda: nn.Conv1d(2, 2, 2).half(), _x(1, 2, 4, dtype=torch.float16)),
]


def OrderedDict_(**items: nn.Module) -> Any:  # noqa: N802 - reads like the collections class it builds
    from collections import OrderedDict

    return OrderedDict(items)
