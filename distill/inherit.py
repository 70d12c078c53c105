"""Weight inheritance: start a student from a slice of a teacher (TinyCLIP's manual inheritance, Wu et al. 2023).

Depth: student layer i takes teacher layer i * T // S (T teacher layers, S student layers: evenly spaced, first
layer kept). Width: the first k channels of every tensor. Attention: whole heads, so q, k and v are sliced head by
head and the student's head width must equal the teacher's. Works on open_clip vision transformers and text
transformers, embeddings and projections included. A tower of another kind (e.g. a FastViT student from a ViT
teacher) is left at its initialization and reported. A Hugging Face text tower is inherited whole, projection
included, when the teacher has the same one (e.g. both use all-MiniLM-L6-v2), and left at init otherwise. Any tensor
that cannot be cut from its teacher counterpart (a student dimension larger than the teacher's, another patch size)
is refused.
"""

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from mdcore.errors import UserInputError

__all__ = ["InheritanceReport", "inherit_weights", "layer_map"]

_BLOCK = re.compile(r"^(?P<prefix>.*resblocks\.)(?P<index>\d+)(?P<rest>\..*)$")


@dataclass
class InheritanceReport:
    rows: list[tuple[str, str, str, tuple, tuple]] = field(default_factory=list)  # (student, teacher, action, ...)
    layer_maps: dict[str, list[int]] = field(default_factory=dict)
    towers_left_at_init: dict[str, str] = field(default_factory=dict)

    def count(self, action: str) -> int:
        return sum(1 for r in self.rows if r[2] == action)

    def table(self) -> str:
        """A readable table: per tower, the layer map and how many tensors were inherited, sliced or left at init."""
        lines = [f"{'tower':<8} {'inherited':>9} {'sliced':>7} {'init':>5}  layers (student <- teacher)"]
        for tower in ("vision", "text", "other"):
            rows = [r for r in self.rows if _tower_of(r[0]) == tower]
            if not rows:
                continue
            counts = [sum(1 for r in rows if r[2] == a) for a in ("inherited", "sliced", "init")]
            if tower in self.towers_left_at_init:
                layers = f"left at init: {self.towers_left_at_init[tower]}"
            else:
                mapping = self.layer_maps.get(tower, [])
                layers = ", ".join(f"{i}<-{t}" for i, t in enumerate(mapping)) or "-"
            lines.append(f"{tower:<8} {counts[0]:>9} {counts[1]:>7} {counts[2]:>5}  {layers}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"inherited": self.count("inherited"), "sliced": self.count("sliced"), "init": self.count("init"),
                "layer_maps": self.layer_maps, "towers_left_at_init": self.towers_left_at_init,
                "tensors": [{"student": s, "teacher": t, "action": a} for s, t, a, _, _ in self.rows]}


def layer_map(teacher_depth: int, student_depth: int) -> list[int]:
    """Evenly spaced teacher layers for each student layer: [0, T//S, 2*T//S, ...] (TinyCLIP's manual rule)."""
    if student_depth > teacher_depth:
        raise UserInputError(f"student has {student_depth} layers but the teacher only {teacher_depth}")
    return [i * teacher_depth // student_depth for i in range(student_depth)]


def _tower_of(name: str) -> str:
    if name.startswith("visual."):
        return "vision"
    if name.startswith(("text.", "token_embedding", "positional_embedding", "transformer.", "ln_final",
                        "text_projection")):
        return "text"
    return "other"


def _text_module(model: nn.Module) -> nn.Module:
    return model.text if hasattr(model, "text") else model


def _tower_kind(model: nn.Module, tower: str) -> str:
    module = model.visual if tower == "vision" else _text_module(model)
    if tower == "vision":
        return type(module).__name__  # VisionTransformer, TimmModel, ModifiedResNet, ...
    if type(module).__name__ == "HFTextEncoder":
        return "HFTextEncoder"
    return "Transformer" if hasattr(module, "transformer") and hasattr(module, "token_embedding") else \
        type(module).__name__


def _depth(model: nn.Module, tower: str) -> int:
    module = model.visual if tower == "vision" else _text_module(model)
    return len(module.transformer.resblocks)


def _heads(model: nn.Module, tower: str) -> int:
    module = model.visual if tower == "vision" else _text_module(model)
    return module.transformer.resblocks[0].attn.num_heads


def _slice_to(source: torch.Tensor, shape: torch.Size, qkv_width: tuple[int, int] | None) -> torch.Tensor:
    """The first-k slice of `source` with the student's `shape`; q, k, v blocks cut separately for in_proj."""
    if qkv_width is not None:  # in_proj weight (3 Wt, Wt) or bias (3 Wt,): take the first Ws rows of each block
        teacher_w, student_w = qkv_width
        blocks = source.split(teacher_w, dim=0)
        source = torch.cat([b[:student_w] for b in blocks], dim=0)
    index = tuple(slice(0, n) for n in shape)
    return source[index]


def inherit_weights(student: nn.Module, teacher: nn.Module) -> InheritanceReport:
    """Copy a slice of `teacher` into `student` in place; see the module docstring. Returns what was done."""
    report = InheritanceReport()
    compatible = {}
    for tower in ("vision", "text"):
        s_kind, t_kind = _tower_kind(student, tower), _tower_kind(teacher, tower)
        vit = {"VisionTransformer", "Transformer"}
        if s_kind == t_kind and s_kind in vit:
            s_depth, t_depth = _depth(student, tower), _depth(teacher, tower)
            report.layer_maps[tower] = layer_map(t_depth, s_depth)
            s_width = _text_module(student).transformer.width if tower == "text" else student.visual.transformer.width
            t_width = _text_module(teacher).transformer.width if tower == "text" else teacher.visual.transformer.width
            s_head, t_head = s_width // _heads(student, tower), t_width // _heads(teacher, tower)
            if s_head != t_head:
                raise UserInputError(f"{tower} tower: student head width {s_head} != teacher head width {t_head}; "
                                     "heads are inherited whole, so they must match")
            compatible[tower] = (t_width, s_width)
        elif s_kind == t_kind == "HFTextEncoder" and _same_shapes(student, teacher, "text."):
            report.layer_maps[tower] = list(range(student.text.transformer.config.num_hidden_layers))
        else:
            report.towers_left_at_init[tower] = f"student {s_kind}, teacher {t_kind}"

    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    new_state = {}
    for name, value in student_state.items():
        tower = _tower_of(name)
        if tower in report.towers_left_at_init or name.endswith("attn_mask"):
            report.rows.append((name, "", "init", tuple(value.shape), ()))
            continue
        source_name = name
        match = _BLOCK.match(name)
        if match and tower in report.layer_maps:
            index = int(match["index"])
            source_name = f"{match['prefix']}{report.layer_maps[tower][index]}{match['rest']}"
        source_name = _teacher_name(source_name, student, teacher)
        if source_name not in teacher_state:
            report.rows.append((name, "", "init", tuple(value.shape), ()))
            continue
        source = teacher_state[source_name]
        if source.ndim != value.ndim or any(s > t for s, t in zip(value.shape, source.shape)):
            raise UserInputError(f"cannot inherit {name} {tuple(value.shape)} from {source_name} "
                                 f"{tuple(source.shape)}: the student is larger than the teacher there")
        if name.endswith("positional_embedding") and tower == "vision" and value.shape[0] != source.shape[0]:
            raise UserInputError(f"cannot inherit {name}: {value.shape[0]} image tokens in the student, "
                                 f"{source.shape[0]} in the teacher (use the same image and patch size)")
        if name.endswith("conv1.weight") and value.shape[2:] != source.shape[2:]:
            raise UserInputError(f"cannot inherit {name}: patch size {tuple(value.shape[2:])} vs teacher "
                                 f"{tuple(source.shape[2:])}")
        qkv = compatible[tower] if "in_proj_" in name and tower in compatible else None
        sliced = _slice_to(source, value.shape, qkv)
        if sliced.shape != value.shape:
            raise UserInputError(f"cannot inherit {name}: got {tuple(sliced.shape)} for {tuple(value.shape)}")
        new_state[name] = sliced.clone().to(value.dtype)
        action = "inherited" if source.shape == value.shape else "sliced"
        report.rows.append((name, source_name, action, tuple(value.shape), tuple(source.shape)))
    student.load_state_dict(new_state, strict=False)
    return report


def _same_shapes(student: nn.Module, teacher: nn.Module, prefix: str) -> bool:
    """Whether every `prefix` tensor of the student exists in the teacher with the same shape (one pretrained
    Hugging Face model on both sides, which is inherited whole: its layers are not open_clip resblocks to slice)."""
    t_state = teacher.state_dict()
    return all(k in t_state and t_state[k].shape == v.shape
               for k, v in student.state_dict().items() if k.startswith(prefix))


def _teacher_name(name: str, student: nn.Module, teacher: nn.Module) -> str:
    """Map a student tensor name onto the teacher's naming (CLIP keeps text tensors at the top level,
    CustomTextCLIP under `text.`)."""
    s_custom, t_custom = hasattr(student, "text"), hasattr(teacher, "text")
    if _tower_of(name) != "text" or s_custom == t_custom:
        return name
    return name.removeprefix("text.") if s_custom else f"text.{name}"
