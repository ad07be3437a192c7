rule aggregate:
    input:
        vesicles=[
            f"{tomogram_dir(dataset, tomo)}/vesicles.csv" for dataset, tomo in TOMOGRAMS
        ],
        info=[
            f"{tomogram_dir(dataset, tomo)}/tomogram.json" for dataset, tomo in TOMOGRAMS
        ],
    output:
        vesicles=f"{OUT}/summary/vesicles.csv",
        per_tomogram=f"{OUT}/summary/per_tomogram.csv",
        per_dataset=f"{OUT}/summary/per_dataset.csv",
        radius_plot=report(
            f"{OUT}/summary/radius_distribution.png",
            caption="../report/radius_distribution.rst",
            category="Statistics",
        ),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.vesicles),
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
