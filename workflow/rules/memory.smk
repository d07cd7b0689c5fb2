# Peak training memory of a residual stack against depth: linear under
# backprop, flat under the adjoint. One fresh process per point, so one
# point's allocations cannot inflate another's peak.

MEMORY = get_experiment("memory")


rule memory_point:
    output:
        metrics="results/memory/grad~{grad}/depth~{depth}/metrics.json",
    log:
        "logs/memory/grad~{grad}/depth~{depth}.log",
    benchmark:
        "results/benchmarks/memory/grad~{grad}/depth~{depth}.tsv"
    conda:
        get_conda_env("memory")
    threads: get_threads("memory")
    resources:
        mem_mb=get_resource("memory", "mem_mb"),
        runtime=get_resource("memory", "runtime"),
        gpu=get_resource("memory", "gpu"),
    params:
        features=MEMORY["features"],
        hidden=MEMORY["hidden"],
        batch_size=MEMORY["batch_size"],
        scheme=MEMORY["scheme"],
        device=get_settings()["device"],
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " memory --grad {wildcards.grad:q}"
        " --depth {wildcards.depth:q} --features {params.features:q}"
        " --hidden {params.hidden:q} --batch-size {params.batch_size:q}"
        " --scheme {params.scheme:q} --device {params.device:q}"
        " --out {params.out:q} > {log:q} 2>&1"


rule plot_memory:
    input:
        get_memory_points,
    output:
        pdf="figures/memory.pdf",
        png=report(
            "figures/memory.png",
            caption="../report/memory.rst",
            category="Figures",
        ),
        csv="figures/memory.csv",
    log:
        "logs/plots/memory.log",
    benchmark:
        "results/benchmarks/plots/memory.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode plot memory --results {input:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_memory,
