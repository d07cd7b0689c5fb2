# The paper's claims, each with the numbers behind it and whether it holds at
# this run's scale. It reads the data files of the figures and the table that
# the config builds, so results of settings no longer in the config never
# leak in.


rule claims:
    input:
        get_claims_inputs,
    output:
        csv=report(
            "results/claims.csv",
            caption="../report/claims.rst",
            category="Claims",
        ),
        md="results/claims.md",
    log:
        "logs/claims.log",
    benchmark:
        "results/benchmarks/claims.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        out=subpath(output.csv, strip_suffix=".csv"),
    shell:
        "OMP_NUM_THREADS={threads} python -m resnet_ode"
        " claims --results {input:q} --out {params.out:q}"
        " > {log:q} 2>&1"


localrules:
    claims,
