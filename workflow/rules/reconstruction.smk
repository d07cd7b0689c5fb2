# Rebuilding a stack's input by the reversed Euler scheme: error about 1/N.

RECONSTRUCTION = get_experiment("reconstruction")


rule reconstruction:
    output:
        metrics="results/reconstruction/metrics.json",
        table="results/reconstruction/reconstruction.csv",
    log:
        "logs/reconstruction/reconstruction.log",
    benchmark:
        "results/benchmarks/reconstruction/reconstruction.tsv"
    conda:
        get_conda_env("reconstruction")
    threads: get_threads("reconstruction")
    resources:
        mem_mb=get_resource("reconstruction", "mem_mb"),
        runtime=get_resource("reconstruction", "runtime"),
        gpu=get_resource("reconstruction", "gpu"),
    params:
        depths=RECONSTRUCTION["depths"],
        images=RECONSTRUCTION["images"],
        width=RECONSTRUCTION["width"],
        seed=RECONSTRUCTION["seed"],
        data=get_data_args("reconstruction", subsets=False),
        device=get_settings()["device"],
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " reconstruction --depths {params.depths:q}"
        " --images {params.images:q} {params.data} --width {params.width:q}"
        " --seed {params.seed:q} --device {params.device:q} --out {params.out:q}"
        " > {log:q} 2>&1"


rule plot_reconstruction_error:
    input:
        metrics=rules.reconstruction.output.metrics,
        table=rules.reconstruction.output.table,
    output:
        pdf="figures/reconstruction_error.pdf",
        png=report(
            "figures/reconstruction_error.png",
            caption="../report/reconstruction_error.rst",
            category="Figures",
        ),
        csv="figures/reconstruction_error.csv",
    log:
        "logs/plots/reconstruction_error.log",
    benchmark:
        "results/benchmarks/plots/reconstruction_error.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot reconstruction-error --results {input.metrics:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_reconstruction_error,
