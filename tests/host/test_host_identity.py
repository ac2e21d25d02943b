"""Identity nodes in a real ComfyUI: the bundled identity workflow (ID Embedder -> PFB with face protection ->
GB -> Identity Score shown on the node), serverless and over HTTP, with the dlib backend."""

from __future__ import annotations

import comfy_harness as harness

WORKFLOW = "api/xmgie_identity_edit.json"


def test_identity_workflow_wiring():
    prompt = harness.load_workflow(WORKFLOW)
    embed_id, embed = harness.node_of(prompt, "XMGIEIDEmbedder")
    _, pfb = harness.node_of(prompt, "XMGIEPFBSampler")
    _, score = harness.node_of(prompt, "XMGIEIdentityScore")
    gb_id, _ = harness.node_of(prompt, "XMGIEGBCompositor")
    assert pfb["inputs"]["id_embed"] == [embed_id, 0] and score["inputs"] == {"source": [embed_id, 0],
                                                                                "edited": [gb_id, 0]}
    assert embed["inputs"]["image"] == harness.node_of(prompt, "VAEEncode")[1]["inputs"]["pixels"]


def test_identity_workflow_runs_and_shows_the_score(runner, tiny_checkpoint):
    prompt = harness.load_workflow(WORKFLOW)
    _, loader = harness.node_of(prompt, "CheckpointLoaderSimple")
    loader["inputs"]["ckpt_name"] = tiny_checkpoint.name
    assert harness.node_of(prompt, "XMGIEIDEmbedder")[1]["inputs"]["backend"] == "dlib"  # the bundled default
    _, sampler = harness.node_of(prompt, "XMGIEPFBSampler")
    sampler["inputs"]["steps"] = 2
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_identity_edit_{runner.name}")
    score_id, _ = harness.node_of(prompt, "XMGIEIdentityScore")
    expected = harness.composite_expectation(prompt)
    run = runner.run(prompt)
    (image,) = run.images(save_id)
    out = runner.read_image(image)
    assert not harness.pixel_mismatch(out, expected.source, expected.far_outside)
    (report,) = run.outputs[score_id]["text"]
    assert report.startswith("image 0: IPS") and "[dlib" in report
