# Fig. 4: the adjoint's gradient error against depth, from one trained
# depth-sweep model resampled along depth. The trained_* segments of the path
# name the depth-sweep run it starts from.

GRADIENT_ERROR = get_experiment("gradient_error")

# The key~value path segments of one comparison.
COMPARISON = "scheme~{scheme}/trained_grad~{grad}/trained_depth~{depth}/seed~{seed}"


rule gradient_error:
    input:
        model=rules.train_depth_sweep.output.model,
        metrics=rules.train_depth_sweep.output.metrics,
    output:
        metrics=f"results/gradient_error/{COMPARISON}/metrics.json",
        table=f"results/gradient_error/{COMPARISON}/gradient_error.csv",
    log:
        f"logs/gradient_error/{COMPARISON}.log",
    benchmark:
        f"results/benchmarks/gradient_error/{COMPARISON}.tsv"
    conda:
        get_conda_env("gradient_error")
    threads: get_threads("gradient_error")
    resources:
        mem_mb=get_resource("gradient_error", "mem_mb"),
        runtime=get_resource("gradient_error", "runtime"),
        gpu=get_resource("gradient_error", "gpu"),
    params:
        model=subpath(input.model, parent=True),
        depths=GRADIENT_ERROR["depths"],
        batch_size=GRADIENT_ERROR["batch_size"],
        data=get_data_args("gradient_error", subsets=False),
        device=get_settings()["device"],
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " gradient-error --model {params.model:q}"
        " --scheme {wildcards.scheme:q} --depths {params.depths:q}"
        " --batch-size {params.batch_size:q} {params.data}"
        " --device {params.device:q} --out {params.out:q} > {log:q} 2>&1"


rule plot_gradient_error:
    input:
        metrics=get_gradient_error_runs,
        tables=get_gradient_error_tables,
    output:
        pdf="figures/gradient_error.pdf",
        png=report(
            "figures/gradient_error.png",
            caption="../report/gradient_error.rst",
            category="Figures",
        ),
        csv="figures/gradient_error.csv",
    log:
        "logs/plots/gradient_error.log",
    benchmark:
        "results/benchmarks/plots/gradient_error.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot gradient-error --results {input.metrics:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_gradient_error,
