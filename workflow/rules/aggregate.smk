rule aggregate:
    input:
        vesicles=[
            f"{tomogram_dir(dataset, tomo)}/vesicles.csv" for dataset, tomo in TOMOGRAMS
        ],
        info=[
            f"{tomogram_dir(dataset, tomo)}/tomogram.json" for dataset, tomo in TOMOGRAMS
        ],
    output:
        summary_outputs(),
    params:
        out_dir=f"{OUT}/summary",
        tomogram_dirs=[tomogram_dir(dataset, tomo) for dataset, tomo in TOMOGRAMS],
    log:
        f"{OUT}/logs/aggregate.log",
    benchmark:
        f"{OUT}/benchmarks/aggregate.tsv"
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow aggregate {params.out_dir:q} {params.tomogram_dirs:q} 2> {log:q}"
