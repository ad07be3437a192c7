rule postprocess:
    input:
        probability=rules.stitch.output[0],
        mask=mask_path,
    output:
        directory(f"{OUT}/{{dataset}}/{{tomo}}/labels.zarr"),
    params:
        threshold=config["postprocess"]["threshold"],
        min_radius=config["postprocess"]["min_radius_nm"],
        max_radius=config["postprocess"]["max_radius_nm"],
        separation=(
            f"--min-separation-nm {config['postprocess']['min_separation_nm']}"
            if config["postprocess"]["min_separation_nm"]
            else ""
        ),
        mask=mask_option,
    log:
        f"{OUT}/logs/postprocess/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/postprocess/{{dataset}}/{{tomo}}.tsv"
    threads: 2
    resources:
        mem_mb=stage_memory_mb("postprocess"),
        runtime=runtime_min(10, 20),
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow postprocess {input.probability:q} {output:q} --threshold {params.threshold} "
        "--min-radius-nm {params.min_radius} --max-radius-nm {params.max_radius} "
        "{params.separation} {params.mask} --workers {threads} 2> {log:q}"


rule spherefit:
    input:
        labels=rules.postprocess.output[0],
        tomogram=tomogram_path,
    output:
        f"{OUT}/{{dataset}}/{{tomo}}/spheres.csv",
    params:
        voxel_size=voxel_size_option,
        min_radius=config["postprocess"]["min_radius_nm"],
        max_radius=config["postprocess"]["max_radius_nm"],
        min_contrast=config["spherefit"]["min_contrast"],
        trusted_contrast=config["spherefit"]["trusted_contrast"],
        min_fit_score=config["spherefit"]["min_fit_score"],
        overlap_tolerance=config["spherefit"]["overlap_tolerance_nm"],
        bilayer=config["spherefit"]["bilayer_thickness_nm"] or 0,
    log:
        f"{OUT}/logs/spherefit/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/spherefit/{{dataset}}/{{tomo}}.tsv"
    threads: 2
    resources:
        mem_mb=stage_memory_mb("spherefit"),
        runtime=runtime_min(10, 20),
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow spherefit {input.labels:q} {input.tomogram:q} {output:q} {params.voxel_size} "
        "--min-radius-nm {params.min_radius} --max-radius-nm {params.max_radius} "
        "--min-contrast {params.min_contrast} --trusted-contrast {params.trusted_contrast} "
        "--min-fit-score {params.min_fit_score} "
        "--overlap-tolerance-nm {params.overlap_tolerance} --bilayer-thickness-nm {params.bilayer} "
        "--workers {threads} 2> {log:q}"
