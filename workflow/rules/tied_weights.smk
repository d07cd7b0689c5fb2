# Fig. 3(a): ResNets whose stages repeat one residual function (an ODE with
# constant weights). The fine-tuning table refines one of these runs too.

TIED_WEIGHTS = get_experiment("tied_weights")


rule train_tied:
    output:
        metrics="results/tied_weights/stage_depths~{stage_depths}/metrics.json",
        model="results/tied_weights/stage_depths~{stage_depths}/model.pt",
    log:
        "logs/tied_weights/stage_depths~{stage_depths}.log",
    benchmark:
        "results/benchmarks/tied_weights/stage_depths~{stage_depths}.tsv"
    conda:
        get_conda_env("tied_weights")
    threads: get_threads("tied_weights")
    resources:
        mem_mb=get_resource("tied_weights", "mem_mb"),
        runtime=get_resource("tied_weights", "runtime"),
        gpu=get_resource("tied_weights", "gpu"),
    params:
        stage_depths=get_stage_depths,
        stem=TIED_WEIGHTS["stem"],
        width=TIED_WEIGHTS["width"],
        seed=TIED_WEIGHTS["seed"],
        train=get_train_args("tied_weights"),
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " tied-resnet --stage-depths {params.stage_depths:q}"
        " --stem {params.stem:q} --width {params.width:q} --seed {params.seed:q}"
        " {params.train} --out {params.out:q} > {log:q} 2>&1"


rule plot_tied_weights:
    input:
        get_tied_runs,
    output:
        pdf="figures/tied_weights.pdf",
        png=report(
            "figures/tied_weights.png",
            caption="../report/tied_weights.rst",
            category="Figures",
        ),
        csv="figures/tied_weights.csv",
    log:
        "logs/plots/tied_weights.log",
    benchmark:
        "results/benchmarks/plots/tied_weights.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot tied-weights --results {input:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_tied_weights,
