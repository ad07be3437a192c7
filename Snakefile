# vesicleflow: synaptic vesicles in cryo-electron tomograms.
# normalize -> tile -> infer (per shard) -> stitch -> postprocess -> spherefit -> export -> aggregate
# Each rule calls one `vesicleflow` CLI command; the science lives in src/vesicleflow.


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/inference.smk"
include: "workflow/rules/postprocess.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        all_inputs,
    default_target: True
