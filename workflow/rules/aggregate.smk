# aggregate: every tomogram's vesicles -> summary tables and plots across datasets (also in the report).


rule aggregate:
    input:
        vesicles=[
            f"{tomogram_dir(dataset, tomo)}/vesicles.csv"
            for dataset, tomo in TOMOGRAMS
        ],
        info=[
            f"{tomogram_dir(dataset, tomo)}/tomogram.json"
            for dataset, tomo in TOMOGRAMS
        ],
        # Not read here: requesting them makes every tomogram's exports part of a complete run.
        exports=[
            f"{tomogram_dir(dataset, tomo)}/{name}"
            for dataset, tomo in TOMOGRAMS
            for name in EXPORT_FILES
        ],
    output:
        vesicles=f"{OUT}/summary/vesicles.csv",
        parquet=f"{OUT}/summary/vesicles.parquet",
        per_tomogram=report(
            f"{OUT}/summary/per_tomogram.csv",
            caption="../report/per_tomogram.rst",
            category="Summary",
            subcategory="Tables",
        ),
        per_dataset=report(
            f"{OUT}/summary/per_dataset.csv",
            caption="../report/per_dataset.rst",
            category="Summary",
            subcategory="Tables",
        ),
        radius_plot=report(
            f"{OUT}/summary/radius_distribution.png",
            caption="../report/radius_distribution.rst",
            category="Summary",
            subcategory="Plots",
        ),
        radius_panels=report(
            f"{OUT}/summary/radius_distribution_per_dataset.png",
            caption="../report/radius_distribution_per_dataset.rst",
            category="Summary",
            subcategory="Plots",
        ),
        nn_plot=report(
            f"{OUT}/summary/nn_distance_distribution.png",
            caption="../report/nn_distance_distribution.rst",
            category="Summary",
            subcategory="Plots",
        ),
        density_plot=report(
            f"{OUT}/summary/density_per_tomogram.png",
            caption="../report/density_per_tomogram.rst",
            category="Summary",
            subcategory="Plots",
        ),
        border_plot=report(
            f"{OUT}/summary/border_distance_distribution.png",
            caption="../report/border_distance_distribution.rst",
            category="Summary",
            subcategory="Plots",
        ),
    log:
        f"{OUT}/logs/aggregate.log",
    benchmark:
        f"{OUT}/benchmarks/aggregate.tsv"
    conda:
        "../../envs/vesicleflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: (2000 + len(TOMOGRAMS)) * attempt,
        runtime=lambda wildcards, attempt: (30 + len(TOMOGRAMS) // 100) * attempt,
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.vesicles),
        tomogram_dirs=[tomogram_dir(dataset, tomo) for dataset, tomo in TOMOGRAMS],
    shell:
        "vesicleflow aggregate {params.out_dir:q} {params.tomogram_dirs:q} 2> {log:q}"
