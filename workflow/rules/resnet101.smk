# Fig. 3(b): on a standard ResNet-101 the adjoint trains far worse than
# backprop, because the learned functions are not smooth in depth.

RESNET101 = get_experiment("resnet101")


rule train_resnet101:
    output:
        metrics="results/resnet101/grad~{grad}/metrics.json",
        model="results/resnet101/grad~{grad}/model.pt",
    log:
        "logs/resnet101/grad~{grad}.log",
    benchmark:
        "results/benchmarks/resnet101/grad~{grad}.tsv"
    conda:
        get_conda_env("resnet101")
    threads: get_threads("resnet101")
    resources:
        mem_mb=get_resource("resnet101", "mem_mb"),
        runtime=get_resource("resnet101", "runtime"),
        gpu=get_resource("resnet101", "gpu"),
    params:
        stage_depths=RESNET101["stage_depths"],
        adjoint_above=RESNET101["adjoint_above"],
        stem=RESNET101["stem"],
        width=RESNET101["width"],
        seed=RESNET101["seed"],
        train=get_train_args("resnet101"),
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " resnet101 --grad {wildcards.grad:q}"
        " --stage-depths {params.stage_depths:q}"
        " --adjoint-above {params.adjoint_above:q} --stem {params.stem:q}"
        " --width {params.width:q} --seed {params.seed:q} {params.train}"
        " --out {params.out:q} > {log:q} 2>&1"


rule plot_resnet101_adjoint:
    input:
        get_resnet101_runs,
    output:
        pdf="figures/resnet101_adjoint.pdf",
        png=report(
            "figures/resnet101_adjoint.png",
            caption="../report/resnet101_adjoint.rst",
            category="Figures",
        ),
        csv="figures/resnet101_adjoint.csv",
    log:
        "logs/plots/resnet101_adjoint.log",
    benchmark:
        "results/benchmarks/plots/resnet101_adjoint.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot resnet101-adjoint --results {input:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_resnet101_adjoint,
