# Fig. 2: a deep linear ResNet trained from zero keeps weights smooth in depth.

LINEAR_WEIGHTS = get_experiment("linear_weights")


rule linear_weights:
    output:
        metrics="results/linear_weights/metrics.json",
        weights="results/linear_weights/weights.csv",
        distance="results/linear_weights/ode_distance.csv",
    log:
        "logs/linear_weights/linear_weights.log",
    benchmark:
        "results/benchmarks/linear_weights/linear_weights.tsv"
    conda:
        get_conda_env("linear_weights")
    threads: get_threads("linear_weights")
    resources:
        mem_mb=get_resource("linear_weights", "mem_mb"),
        runtime=get_resource("linear_weights", "runtime"),
        gpu=get_resource("linear_weights", "gpu"),
    params:
        depth=LINEAR_WEIGHTS["depth"],
        dim=LINEAR_WEIGHTS["dim"],
        lr=LINEAR_WEIGHTS["lr"],
        max_steps=LINEAR_WEIGHTS["max_steps"],
        tol=LINEAR_WEIGHTS["tol"],
        seed=LINEAR_WEIGHTS["seed"],
        ode_depths=LINEAR_WEIGHTS["ode_depths"],
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " linear-weights --depth {params.depth:q}"
        " --dim {params.dim:q} --lr {params.lr:q} --max-steps {params.max_steps:q}"
        " --tol {params.tol:q} --seed {params.seed:q}"
        " --ode-depths {params.ode_depths:q} --out {params.out:q} > {log:q} 2>&1"


rule plot_linear_weights:
    input:
        metrics=rules.linear_weights.output.metrics,
        weights=rules.linear_weights.output.weights,
        distance=rules.linear_weights.output.distance,
    output:
        pdf="figures/linear_weights.pdf",
        png=report(
            "figures/linear_weights.png",
            caption="../report/linear_weights.rst",
            category="Figures",
        ),
        csv="figures/linear_weights.csv",
    log:
        "logs/plots/linear_weights.log",
    benchmark:
        "results/benchmarks/plots/linear_weights.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot linear-weights --results {input.metrics:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_linear_weights,
