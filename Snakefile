# Regenerates the figures, tables and claims of "Do Residual Neural Networks
# discretize Neural ODEs?" (Sander, Ablin, Peyre, NeurIPS 2022).
#
#   snakemake --cores all                        # quick preset, a few minutes
#   snakemake --cores all --config preset=paper  # the authors' settings
#   snakemake --profile profiles/slurm --config preset=paper
#   snakemake --report report.html
#
# config.yaml documents every setting; workflow/rules/ holds one file per
# experiment and workflow/rules/common.smk the helpers they share.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


convert_config_strings(config)
validate(config, "workflow/schemas/config.schema.yaml")
check_finetuning_stage()


include: "workflow/rules/linear_weights.smk"
include: "workflow/rules/reconstruction.smk"
include: "workflow/rules/tied_weights.smk"
include: "workflow/rules/resnet101.smk"
include: "workflow/rules/depth_sweep.smk"
include: "workflow/rules/gradient_error.smk"
include: "workflow/rules/memory.smk"
include: "workflow/rules/finetuning.smk"
include: "workflow/rules/claims.smk"


report_left_out_artifacts()


rule all:
    default_target: True
    input:
        get_paper_artifacts(),


localrules:
    all,
