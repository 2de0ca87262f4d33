"""Task-Balanced Distillation in a Detectron2 train_net.py (the lines marked TBD are the changes).

    python train_net.py --num-gpus 8 --teacher-weights teacher/model_final.pth \
        --config-file student.yaml --teacher-config teacher.yaml \
        --train-json train.json --train-images train/ --val-json val.json --val-images val/ \
        SOLVER.MAX_ITER 90000 OUTPUT_DIR output/tbd

--teacher NAME takes a teacher of tbd's registry (`tbd teachers`) instead of --teacher-config and
--teacher-weights: its weights, or on the embedded data a teacher trained here once and cached.
Without --train-json it trains on tbd's embedded dataset with tbd's 128 px configs (a demo).
At the end OUTPUT_DIR holds model_student.pth + model_student.yaml for plain Detectron2, and
summary.json: the teacher's and the student's AP and harmonious ratios.
"""

import os
from pathlib import Path

import tbd  # noqa: F401  (TBD: first; on Detectron2 0.6 with a recent torch it applies tbd.compat)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from tbd.config import CONFIG_DIR, get_cfg
from tbd.data import num_classes, register_shapes, register_user_coco
from tbd.distill import TBDistiller, export_student
from tbd.distill.hooks import insert_distill_hooks
from tbd.engine.optim import build_optimizer
from tbd.summaries import summarize_run, summary_options
from tbd.teachers import resolve_teacher


class DistillTrainer(DefaultTrainer):
    @classmethod
    def build_model(cls, cfg):
        student = super().build_model(cfg)
        return TBDistiller.from_student(cfg, student)  # TBD: the teacher comes from cfg.DISTILL.*

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)  # SGD, or AdamW with SOLVER.OPTIMIZER "ADAMW"

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "eval"))

    def build_hooks(self):
        # TBD: at each TEST.EVAL_PERIOD, the student trained alone (DISTILL.WITH_BASELINE) and alpha
        # following the teacher's lead (DISTILL.LEAD_HD_WEIGHT)
        return insert_distill_hooks(self, super().build_hooks(), self.cfg)


def register_datasets(args):
    """Register the data in this process (launch() starts each worker as a new process)."""
    if args.train_json:
        train = register_user_coco(args.train_json, args.train_images, "train")
        val = register_user_coco(args.val_json, args.val_images, "val") if args.val_json else train
        return train, val
    return register_shapes()  # tbd's embedded dataset, generated on first use


def build_cfg(args):
    if args.train_json and not args.config_file:
        raise SystemExit("with your own data, pass your student's config: --config-file student.yaml")
    train, val = register_datasets(args)
    cfg = get_cfg()  # Detectron2's defaults + tbd's keys (DISTILL.*: TBD)
    cfg.merge_from_file(args.config_file or str(CONFIG_DIR / "retinanet_R18_FPN.yaml"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
    classes = ["MODEL.RETINANET.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES"]
    n = str(num_classes(train))
    cfg.merge_from_list([x for key in classes for x in (key, n)])
    cfg.DISTILL.TEACHER_CONFIG = args.teacher_config  # TBD: the teacher, same classes and device
    cfg.DISTILL.TEACHER_WEIGHTS = args.teacher_weights
    cfg.DISTILL.TEACHER_OPTS = [x for key in classes for x in (key, n)]
    # TBD: the opts DISTILL.WITH_BASELINE True also train the student alone on the same batches (the
    # yardstick of the gain), evaluated beside the distilled one by the hooks of build_hooks
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def main(args):
    cfg = build_cfg(args)
    default_setup(cfg, args)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # TBD: the student alone (works under DDP too) and its config, for plain Detectron2
    export_student(trainer.model, os.path.join(cfg.OUTPUT_DIR, "model_student.pth"), cfg)


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--teacher", help="TBD: a teacher of tbd's registry, e.g. r50 (see `tbd teachers`)")
    parser.add_argument(
        "--teacher-config",
        default=str(CONFIG_DIR / "fcos_R50_FPN.yaml"),
        help="the teacher's config (default: the r50 teacher that `tbd distill --teacher r50` trains and caches)",
    )
    parser.add_argument("--teacher-weights", help="the trained teacher's checkpoint (or --teacher)")
    parser.add_argument("--train-json", help="COCO-format training annotations (default: embedded data)")
    parser.add_argument("--train-images", help="image directory of --train-json")
    parser.add_argument("--val-json", help="COCO-format validation annotations")
    parser.add_argument("--val-images", help="image directory of --val-json")
    args = parser.parse_args()
    if args.teacher:  # TBD: its config and weights, trained here first (once, then cached) if need be
        args.teacher_config = None
        args.teacher_config, args.teacher_weights = resolve_teacher(args, *register_datasets(args))
    elif not args.teacher_weights:
        parser.error("pass --teacher-weights (with --teacher-config), or --teacher NAME")
    launch(main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,))
    # TBD: the teacher's and the student's AP and harmonious ratios, into OUTPUT_DIR/summary.json
    cfg = build_cfg(args)
    student = Path(args.config_file or "retinanet_R18_FPN").stem
    teacher = {"teacher": args.teacher} if args.teacher else {"teacher_config": args.teacher_config}
    summarize_run(cfg, summary_options(student, cfg.MODEL.META_ARCHITECTURE, **teacher))
