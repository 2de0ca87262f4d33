"""``CoDETR``: Deformable-DETR++ with Co-DETR's collaborative hybrid assignment training.

Training (``model(batched_inputs)`` in train mode) returns the loss dict of
``L_global = sum_l (L_dec_l + lambda1 sum_i L_dec_{i,l} + lambda2 L_enc)`` plus the two-stage
proposal loss:

* ``L_dec_l``: layer l of the one-to-one branch (Hungarian matching; focal, L1, GIoU);
* ``L_enc``: the K auxiliary one-to-many heads (``aux_api``) on the multi-scale adapter's pyramid;
* ``L_dec_{i,l}``: layer l of positive-query branch i: head i's positives B_i^pos made into queries
  ``Q_i = Linear(PE(B_i^pos)) + Linear(E(F*, pos))`` and sent through the same decoder layers,
  each compared with the target its head assigned (no matching).

Inference runs the backbone, encoder and the one-to-one decoder branch only and returns
Detectron2 ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``) in original image pixels.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from tbd.modeling.codetr import aux_api
from tbd.modeling.codetr.aux_api import AuxHeadsBuilder, AuxPositives
from tbd.modeling.codetr.losses import LossWeights, combine_losses, global_normaliser, paired_losses
from tbd.modeling.codetr.matching import HungarianMatcher, cxcywh_to_xyxy, xyxy_to_cxcywh
from tbd.modeling.codetr.transformer import (
    MLP,
    DecoderLayer,
    DeformableDecoder,
    DeformableEncoder,
    EncoderLayer,
    box_position_embedding,
    inverse_sigmoid,
    map_position_embedding,
)

_INVALID_LOGIT = -1e4  # keeps padded / border proposals out of the two-stage top-k


def _proj(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    conv = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, out_ch))


class EncoderState:
    """The flattened encoder output and what is needed to read it back as maps."""

    def __init__(self, memory: Tensor, padding: Tensor, shapes: Tensor, valid_ratios: Tensor) -> None:
        self.memory, self.padding, self.shapes, self.valid_ratios = memory, padding, shapes, valid_ratios

    def maps(self) -> list[Tensor]:
        """The memory as ``[B, C, H_l, W_l]`` maps, finest first."""
        b, _, c = self.memory.shape
        sizes = [h * w for h, w in self.shapes.tolist()]
        return [
            m.transpose(1, 2).reshape(b, c, h, w)
            for m, (h, w) in zip(self.memory.split(sizes, 1), self.shapes.tolist())
        ]


@META_ARCH_REGISTRY.register()
class CoDETR(nn.Module):
    def __init__(self, cfg: CfgNode, aux_heads_builder: Optional[AuxHeadsBuilder] = None) -> None:
        super().__init__()
        c = cfg.MODEL.CODETR
        self.num_classes = int(c.NUM_CLASSES)
        self.num_queries = int(c.NUM_QUERIES)
        self.two_stage, self.refine = bool(c.TWO_STAGE), bool(c.BOX_REFINE)
        self.enc_agnostic = bool(c.ENC_CLASS_AGNOSTIC)
        self.lambda1, self.lambda2 = float(c.LAMBDA1), float(c.LAMBDA2)
        self.enc_weight_per_layer = bool(c.ENC_WEIGHT_PER_LAYER)
        self.pos_query_features = bool(c.POS_QUERY_FEATURES)
        self.max_pos_queries = int(c.MAX_POS_QUERIES)
        self.lr_factors = (float(c.BACKBONE_LR_FACTOR), float(c.LINEAR_PROJ_LR_FACTOR))
        self.detections_per_image = int(cfg.TEST.DETECTIONS_PER_IMAGE)
        self.input_format = str(cfg.INPUT.FORMAT)  # read by TBDistiller as a teacher
        d = self.hidden_dim = int(c.HIDDEN_DIM)
        n_levels = int(c.NUM_FEATURE_LEVELS)

        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        self.in_features = list(c.IN_FEATURES)
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.CODETR.IN_FEATURES {missing} are not backbone outputs ({sorted(shapes)}); "
                "list them in MODEL.RESNETS.OUT_FEATURES"
            )
        if n_levels < len(self.in_features):
            raise ValueError(
                f"MODEL.CODETR.NUM_FEATURE_LEVELS ({n_levels}) is below the {len(self.in_features)} IN_FEATURES"
            )
        projs = [_proj(shapes[f].channels, d, 1, 1) for f in self.in_features]
        last = shapes[self.in_features[-1]].channels
        for i in range(n_levels - len(self.in_features)):
            projs.append(_proj(last if i == 0 else d, d, 3, 2))
        self.input_proj = nn.ModuleList(projs)
        strides = [shapes[f].stride for f in self.in_features]
        while len(strides) < n_levels:
            strides.append(strides[-1] * 2)
        self.level_embed = nn.Parameter(torch.randn(n_levels, d) * 0.02)

        args = (d, int(c.DIM_FEEDFORWARD), float(c.DROPOUT), n_levels, int(c.NHEADS))
        self.encoder = DeformableEncoder(EncoderLayer(*args, int(c.ENC_N_POINTS)), int(c.ENC_LAYERS))
        self.decoder = DeformableDecoder(DecoderLayer(*args, int(c.DEC_N_POINTS)), int(c.DEC_LAYERS))
        n_dec = int(c.DEC_LAYERS)
        if self.refine:  # one head per layer
            self.class_embed = nn.ModuleList(self._class_head(self.num_classes) for _ in range(n_dec))
            self.bbox_embed = nn.ModuleList(self._box_head() for _ in range(n_dec))
        else:  # one head shared by the layers
            cls_head, box_head = self._class_head(self.num_classes), self._box_head()
            self.class_embed = nn.ModuleList([cls_head] * n_dec)
            self.bbox_embed = nn.ModuleList([box_head] * n_dec)
        if self.two_stage:
            self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
            self.enc_class = self._class_head(1 if self.enc_agnostic else self.num_classes)
            self.enc_bbox = self._box_head()
            self.pos_trans = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d))
        else:  # learnt queries with learnt reference boxes
            self.query_embed = nn.Embedding(self.num_queries, 2 * d)
            self.reference_boxes = nn.Linear(d, 4)

        # Co-DETR: multi-scale adapter (extra levels below the coarsest encoder map) + aux heads
        extra = int(c.ADAPTER_EXTRA_LEVELS)
        self.pyramid_strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(extra)]
        builder = aux_heads_builder if aux_heads_builder is not None else aux_api.AUX_HEADS_BUILDER
        self.aux_heads = (
            builder(cfg, d, list(self.pyramid_strides)) if builder is not None else nn.ModuleList()
        )
        k = len(self.aux_heads)
        # without auxiliary heads nothing reads the pyramid: no adapter (no parameter DDP would miss)
        self.adapter = nn.ModuleList(_proj(d, d, 3, 2) for _ in range(extra if k else 0))
        self.pos_box_trans = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)) for _ in range(k)
        )
        self.pos_feat_trans = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(k))

        self.loss_weights = LossWeights(
            float(c.CLASS_WEIGHT),
            float(c.BBOX_WEIGHT),
            float(c.GIOU_WEIGHT),
            float(c.FOCAL_ALPHA),
            float(c.FOCAL_GAMMA),
        )
        self.matcher = HungarianMatcher(
            float(c.COST_CLASS),
            float(c.COST_BBOX),
            float(c.COST_GIOU),
            float(c.FOCAL_ALPHA),
            float(c.FOCAL_GAMMA),
        )
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def _class_head(self, n: int) -> nn.Linear:
        head = nn.Linear(self.hidden_dim, n)
        nn.init.constant_(head.bias, -4.595)  # prior probability 0.01, as the focal-loss detectors
        return head

    def _box_head(self) -> MLP:
        head = MLP(self.hidden_dim, self.hidden_dim, 4, 3)
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)
        return head

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def param_lr_factors(self) -> list[tuple[nn.Parameter, float]]:
        """Learning-rate multipliers read by ``tbd.engine.optim.build_optimizer`` (the DETR recipe)."""
        backbone, linear_proj = self.lr_factors
        out = []
        for name, p in self.named_parameters():
            if name.startswith("backbone."):
                out.append((p, backbone))
            elif ".sampling_offsets." in name or name.startswith("reference_boxes."):
                out.append((p, linear_proj))
        return out

    # --- input ----------------------------------------------------------------------------
    def preprocess(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, 0)

    def normalised_targets(self, gt: list[Instances], images: ImageList) -> tuple[list[Tensor], list[Tensor]]:
        classes, boxes = [], []
        for inst, (h, w) in zip(gt, images.image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            classes.append(inst.gt_classes.to(self.device))
            boxes.append(xyxy_to_cxcywh(inst.gt_boxes.tensor.to(self.device) / scale))
        return classes, boxes

    # --- encoder --------------------------------------------------------------------------
    def encode(self, images: ImageList) -> EncoderState:
        feats = self.backbone(images.tensor)
        srcs = [proj(feats[f]) for proj, f in zip(self.input_proj, self.in_features)]
        x = feats[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features) :]:
            x = proj(x)
            srcs.append(x)
        b, _, ph, pw = images.tensor.shape
        pad = torch.ones((b, ph, pw), dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        flat, pos, masks, shapes, ratios = [], [], [], [], []
        for lvl, src in enumerate(srcs):
            mask = F.interpolate(pad[None].float(), size=src.shape[-2:])[0].bool()
            pe = map_position_embedding(mask, self.hidden_dim // 2).to(src.dtype)
            flat.append(src.flatten(2).transpose(1, 2))
            pos.append(pe.flatten(2).transpose(1, 2) + self.level_embed[lvl])
            masks.append(mask.flatten(1))
            shapes.append(src.shape[-2:])
            # at least one cell: an image smaller than a coarse level's stride would get no cell
            valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).to(src.dtype) / mask.shape[1]
            valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).to(src.dtype) / mask.shape[2]
            ratios.append(torch.stack([valid_w, valid_h], -1))
        shapes_t = torch.as_tensor(shapes, dtype=torch.long, device=self.device)
        padding = torch.cat(masks, 1)
        valid_ratios = torch.stack(ratios, 1)
        memory = self.encoder(torch.cat(flat, 1), torch.cat(pos, 1), shapes_t, valid_ratios, padding)
        return EncoderState(memory, padding, shapes_t, valid_ratios)

    def pyramid(self, state: EncoderState) -> list[Tensor]:
        """The multi-scale adapter: the encoder's maps plus stride-2 levels below the coarsest."""
        maps = state.maps()
        for conv in self.adapter:
            maps.append(conv(maps[-1]))
        return maps

    # --- queries --------------------------------------------------------------------------
    def proposals(self, state: EncoderState) -> tuple[Tensor, Tensor]:
        """Two-stage: per memory token a class logit and a box ``(cx, cy, w, h)`` refined from a
        proposal centred on the token, ``0.05 * 2^l`` wide on level l. ``[B, S, K]``, ``[B, S, 4]``."""
        parts = []
        b = state.memory.shape[0]
        start = 0
        for lvl, (h, w) in enumerate(state.shapes.tolist()):
            mask = state.padding[:, start : start + h * w].view(b, h, w)
            valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).to(state.memory.dtype)
            valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).to(state.memory.dtype)
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=state.memory.dtype, device=self.device),
                torch.arange(w, dtype=state.memory.dtype, device=self.device),
                indexing="ij",
            )
            cx = (xs.reshape(1, -1) + 0.5) / valid_w[:, None]
            cy = (ys.reshape(1, -1) + 0.5) / valid_h[:, None]
            wh = torch.full_like(cx, 0.05 * 2.0**lvl)
            parts.append(torch.stack([cx, cy, wh, wh], -1))
            start += h * w
        anchors = torch.cat(parts, 1)
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~state.padding
        memory = self.enc_output(state.memory.masked_fill(~valid[..., None], 0.0))
        logits = self.enc_class(memory)
        logits = logits.masked_fill(~valid[..., None], _INVALID_LOGIT)
        boxes = (self.enc_bbox(memory) + inverse_sigmoid(anchors)).sigmoid()
        return logits, boxes

    def main_queries(self, state: EncoderState, enc_logits: Optional[Tensor], enc_boxes: Optional[Tensor]):
        d = self.hidden_dim
        if self.two_stage:
            assert enc_logits is not None and enc_boxes is not None
            k = min(self.num_queries, enc_logits.shape[1])
            idx = enc_logits.max(-1)[0].topk(k, dim=1)[1]
            reference = torch.gather(enc_boxes, 1, idx[..., None].expand(-1, -1, 4)).detach()
            query_pos, tgt = self.pos_trans(box_position_embedding(reference, d // 2)).split(d, -1)
        else:
            b = state.memory.shape[0]
            query_pos, tgt = self.query_embed.weight[None].expand(b, -1, -1).split(d, -1)
            reference = self.reference_boxes(query_pos).sigmoid()
        return tgt, query_pos, reference

    def positive_queries(
        self, head: int, positives: list[AuxPositives], pyramid: list[Tensor], images: ImageList
    ) -> Optional[dict[str, Tensor]]:
        """Branch ``head``'s queries ``Q_i = Linear(PE(B_pos)) + Linear(E(F*, pos))``, padded to the
        most positives of an image; None when no image has a positive."""
        d = self.hidden_dim
        b = len(positives)
        kept = [self._cap(p) for p in positives]
        m = max((len(p.boxes) for p in kept), default=0)
        if m == 0:
            return None
        boxes = torch.full((b, m, 4), 0.5, device=self.device)
        gt_boxes = torch.full((b, m, 4), 0.5, device=self.device)
        gt_classes = torch.zeros((b, m), dtype=torch.long, device=self.device)
        flat_index = torch.zeros((b, m), dtype=torch.long, device=self.device)
        valid = torch.zeros((b, m), dtype=torch.bool, device=self.device)
        sizes = [f.shape[-2] * f.shape[-1] for f in pyramid]
        starts = torch.tensor([0] + sizes[:-1], device=self.device).cumsum(0)
        for i, (p, (h, w)) in enumerate(zip(kept, images.image_sizes)):
            n = len(p.boxes)
            if n == 0:
                continue
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes[i, :n] = xyxy_to_cxcywh(p.boxes.detach().to(self.device).float() / scale).clamp(0.0, 1.0)
            gt_boxes[i, :n] = xyxy_to_cxcywh(p.gt_boxes.to(self.device).float() / scale)
            gt_classes[i, :n] = p.gt_classes.to(self.device)
            levels, locations = p.levels.to(self.device), p.locations.to(self.device)
            sizes_t = torch.tensor(sizes, device=self.device)
            if bool(((levels < 0) | (levels >= len(sizes))).any()) or bool(
                ((locations < 0) | (locations >= sizes_t[levels.clamp(0, len(sizes) - 1)])).any()
            ):
                raise ValueError(
                    f"auxiliary head {head} ({getattr(self.aux_heads[head], 'name', '?')}) gave positives "
                    f"outside the pyramid: levels must be in [0, {len(sizes)}) and locations index the "
                    "padded map of their level (y * W_l + x)"
                )
            flat_index[i, :n] = starts[levels] + locations
            valid[i, :n] = True
        query_pos, tgt = self.pos_box_trans[head](box_position_embedding(boxes, d // 2)).split(d, -1)
        if self.pos_query_features:
            feats = torch.cat([f.flatten(2) for f in pyramid], 2).transpose(1, 2)  # [B, S', C]
            sampled = torch.gather(feats, 1, flat_index[..., None].expand(-1, -1, d))
            tgt = tgt + self.pos_feat_trans[head](sampled)
        return {
            "tgt": tgt,
            "query_pos": query_pos,
            "reference": boxes,
            "gt_boxes": gt_boxes,
            "gt_classes": gt_classes,
            "valid": valid,
        }

    def _cap(self, p: AuxPositives) -> AuxPositives:
        n = len(p.boxes)
        if self.max_pos_queries <= 0 or n <= self.max_pos_queries:
            return p
        keep = torch.randperm(n, device=p.boxes.device)[: self.max_pos_queries]
        return AuxPositives(
            p.boxes[keep], p.gt_boxes[keep], p.gt_classes[keep], p.levels[keep], p.locations[keep]
        )

    def decode(
        self, state: EncoderState, tgt: Tensor, query_pos: Tensor, reference: Tensor, query_padding=None
    ):
        states, boxes = self.decoder(
            tgt,
            query_pos,
            reference,
            state.memory,
            state.shapes,
            state.valid_ratios,
            state.padding,
            self.bbox_embed,
            self.refine,
            query_padding,
        )
        logits = [head(h) for head, h in zip(self.class_embed, states)]
        return logits, boxes

    # --- losses ---------------------------------------------------------------------------
    def matched_losses(self, logits: Tensor, boxes: Tensor, gt_classes: list[Tensor], gt_boxes: list[Tensor]):
        matches = self.matcher(logits, boxes, gt_classes, gt_boxes)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        tgt_cls = torch.cat([c[g] for c, (_, g) in zip(gt_classes, matches)])
        tgt_box = torch.cat([bx[g] for bx, (_, g) in zip(gt_boxes, matches)])
        norm = global_normaliser(sum(len(c) for c in gt_classes), logits.device)
        return paired_losses(logits, boxes, batch_idx, query_idx, tgt_cls, tgt_box, norm, self.loss_weights)

    def branch_losses(
        self, logits: list[Tensor], boxes: list[Tensor], q: dict[str, Tensor]
    ) -> list[dict[str, Tensor]]:
        """A positive-query branch: query j of image b against its own assigned target (no matching)."""
        batch_idx, query_idx = q["valid"].nonzero(as_tuple=True)
        tgt_cls = q["gt_classes"][batch_idx, query_idx]
        tgt_box = q["gt_boxes"][batch_idx, query_idx]
        norm = global_normaliser(len(batch_idx), self.device)
        return [
            paired_losses(lg, bx, batch_idx, query_idx, tgt_cls, tgt_box, norm, self.loss_weights, q["valid"])
            for lg, bx in zip(logits, boxes)
        ]

    def run_positive_branch(
        self, state: EncoderState, q: dict[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        padding = ~q["valid"]
        padding[:, 0] = False  # an image without positives keeps one (ignored) key: no all-masked softmax
        return self.decode(state, q["tgt"], q["query_pos"], q["reference"], padding)

    # --- forward --------------------------------------------------------------------------
    def forward(self, batched_inputs: list[dict[str, Any]]):
        images = self.preprocess(batched_inputs)
        state = self.encode(images)
        enc_logits, enc_boxes = self.proposals(state) if self.two_stage else (None, None)
        tgt, query_pos, reference = self.main_queries(state, enc_logits, enc_boxes)
        logits, boxes = self.decode(state, tgt, query_pos, reference)
        if not self.training:
            return self.inference(logits[-1], boxes[-1], batched_inputs, images)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "CoDETR in training mode needs 'instances' (the ground truth) in every input dict"
            )
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        gt_classes, gt_boxes = self.normalised_targets(gt, images)
        decoder = [self.matched_losses(lg, bx, gt_classes, gt_boxes) for lg, bx in zip(logits, boxes)]
        proposal: dict[str, Tensor] = {}
        if self.two_stage:
            assert enc_logits is not None and enc_boxes is not None
            enc_classes = [torch.zeros_like(c) for c in gt_classes] if self.enc_agnostic else gt_classes
            proposal = self.matched_losses(enc_logits, enc_boxes, enc_classes, gt_boxes)
        encoder_heads: dict[str, Tensor] = {}
        branches: list[list[dict[str, Tensor]]] = []
        if len(self.aux_heads):
            pyramid = self.pyramid(state)
            for i, head in enumerate(self.aux_heads):
                out = head(pyramid, list(images.image_sizes), gt)
                encoder_heads.update(out.losses)
                q = self.positive_queries(i, out.positives, pyramid, images)
                if q is not None:
                    branches.append(self.branch_losses(*self.run_positive_branch(state, q), q))
                else:  # no positive in the batch: a zero that still reaches the branch's own
                    # parameters, so that DistributedDataParallel sees every parameter used
                    unused = [*self.pos_box_trans[i].parameters(), *self.pos_feat_trans[i].parameters()]
                    branches.append([{"cls": sum(p.sum() * 0.0 for p in unused)}])
        return combine_losses(
            decoder, proposal, branches, encoder_heads, self.lambda1, self.lambda2, self.enc_weight_per_layer
        )

    def inference(
        self, logits: Tensor, boxes: Tensor, batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Instances]]:
        b, q, k = logits.shape
        scores = logits.sigmoid().flatten(1)
        top = min(self.detections_per_image, q * k)
        top_scores, top_idx = scores.topk(top, dim=1)
        query = torch.div(top_idx, k, rounding_mode="floor")
        xyxy = cxcywh_to_xyxy(torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4)))
        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            inst = Instances((h, w))
            scale = torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
            inst.pred_boxes = Boxes(xyxy[i] * scale)
            inst.scores = top_scores[i]
            inst.pred_classes = top_idx[i] % k
            height = batched_inputs[i].get("height", h)
            width = batched_inputs[i].get("width", w)
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results
