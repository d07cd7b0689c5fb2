# Table 2: untie a tied model and refine one stage (counted from 1, or "all")
# with the adjoint.

FINETUNING = get_experiment("finetuning")

# The key~value path segments of one refinement.
REFINEMENT = "stage_depths~{stage_depths}/stage~{stage}"


rule finetune:
    input:
        model=rules.train_tied.output.model,
        metrics=rules.train_tied.output.metrics,
    output:
        metrics=f"results/finetuning/{REFINEMENT}/metrics.json",
        model=f"results/finetuning/{REFINEMENT}/model.pt",
    log:
        f"logs/finetuning/{REFINEMENT}.log",
    benchmark:
        f"results/benchmarks/finetuning/{REFINEMENT}.tsv"
    conda:
        get_conda_env("finetuning")
    threads: get_threads("finetuning")
    resources:
        mem_mb=get_resource("finetuning", "mem_mb"),
        runtime=get_resource("finetuning", "runtime"),
        gpu=get_resource("finetuning", "gpu"),
    params:
        model=subpath(input.model, parent=True),
        seed=FINETUNING["seed"],
        train=get_train_args("finetuning"),
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " finetune --model {params.model:q}"
        " --stage {wildcards.stage:q} --seed {params.seed:q} {params.train}"
        " --out {params.out:q} > {log:q} 2>&1"


rule table_finetuning:
    input:
        get_finetuning_runs,
    output:
        csv=report(
            "results/tables/finetuning.csv",
            caption="../report/finetuning.rst",
            category="Tables",
        ),
        md="results/tables/finetuning.md",
    log:
        "logs/tables/finetuning.log",
    benchmark:
        "results/benchmarks/tables/finetuning.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.csv, strip_suffix=".csv"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " table finetuning --results {input:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    table_finetuning,
