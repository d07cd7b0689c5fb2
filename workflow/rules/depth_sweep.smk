# Fig. 3(c): test error of the small ResNet against depth, for Euler and Heun
# steps trained by backprop or by the adjoint.

DEPTH_SWEEP = get_experiment("depth_sweep")

# The key~value path segments of one run.
SWEEP_RUN = "scheme~{scheme}/grad~{grad}/depth~{depth}/seed~{seed}"


rule train_depth_sweep:
    output:
        metrics=f"results/depth_sweep/{SWEEP_RUN}/metrics.json",
        model=f"results/depth_sweep/{SWEEP_RUN}/model.pt",
    log:
        f"logs/depth_sweep/{SWEEP_RUN}.log",
    benchmark:
        f"results/benchmarks/depth_sweep/{SWEEP_RUN}.tsv"
    conda:
        get_conda_env("depth_sweep")
    threads: get_threads("depth_sweep")
    resources:
        mem_mb=get_resource("depth_sweep", "mem_mb"),
        runtime=get_resource("depth_sweep", "runtime"),
        gpu=get_resource("depth_sweep", "gpu"),
    params:
        init_depth=DEPTH_SWEEP["init_depth"],
        train=get_train_args("depth_sweep"),
        out=subpath(output.metrics, parent=True),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " depth-sweep --scheme {wildcards.scheme:q}"
        " --grad {wildcards.grad:q} --depth {wildcards.depth:q}"
        " --seed {wildcards.seed:q} --init-depth {params.init_depth:q}"
        " {params.train} --out {params.out:q} > {log:q} 2>&1"


rule plot_depth_sweep:
    input:
        get_depth_sweep_runs,
    output:
        pdf="figures/depth_sweep.pdf",
        png=report(
            "figures/depth_sweep.png",
            caption="../report/depth_sweep.rst",
            category="Figures",
        ),
        csv="figures/depth_sweep.csv",
    log:
        "logs/plots/depth_sweep.log",
    benchmark:
        "results/benchmarks/plots/depth_sweep.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.pdf, strip_suffix=".pdf"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " plot depth-sweep --results {input:q}"
        " --out {params.out:q} > {log:q} 2>&1"


localrules:
    plot_depth_sweep,
