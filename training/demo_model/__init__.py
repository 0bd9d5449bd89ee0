"""The embedded demo model: a small LISA trained from scratch on the reasoning-shapes data.

The demo model is trained by this project's own training code on the synthetic "reasoning
shapes" data (:mod:`training.shapes`). Its starting checkpoint is built here (``init``, see
:func:`~training.demo_model.recipe.build_initial_demo_checkpoint`); one ``lisa-train`` stage
(``training/configs/shapes_demo.yaml``) and ``lisa-export`` make the shipped model of it:

1. a LLaMA-like SentencePiece tokenizer trained on the data's own vocabulary (every text, answer
   and explanation of the training split, plus the chat template and the paper's question and
   answer lists), with the LISA-7B-v1 added tokens (``<im_patch> <im_start> <im_end> [SEG]``)
   (:mod:`~training.demo_model.tokenizer`);
2. a randomly initialised LISA of :data:`~training.demo_model.recipe.DEMO_SPEC` with the scales
   of :func:`~training.demo_model.recipe.scale_for_scratch_training_`
   (:mod:`~training.demo_model.recipe`);
3. its LLM given a text-only language warm-up on the training split's conversations, LISA's
   stand-in for a pretrained LLaVA, and its ``[SEG]`` projector centred on the warmed state
   (:mod:`~training.demo_model.language`);
4. its SAM image encoder (a small convolutional one, :class:`lisa_model.sam.ConvImageEncoder`)
   taught the shape, colour and relations under each patch
   (:mod:`~training.demo_model.sam_encoder`);
5. its SAM mask decoder taught to segment what a concept prompt names, steps 4 and 5 together
   the stand-in for SAM's pretraining; last, the ``[SEG]`` projector fitted so that the LLM's
   state for a query lands on its concept's prompt (:mod:`~training.demo_model.sam_decoder`);
6. saved self-contained in the published layout (CLIP tower included), so training starts from
   it like from any checkpoint and the result loads with :func:`lisa_model.checkpoint.load_lisa`.

The warm-ups share one optimiser loop (:mod:`~training.demo_model.loop`). A trained model is
scored per query kind by :mod:`~training.demo_model.evaluation`; the example scenes bundled with
the package are written by :mod:`~training.demo_model.examples`. Nothing is imported here.

Command line (:mod:`~training.demo_model.cli`)::

    python -m training.demo_model init --data runs/shapes --out runs/demo/init
    python -m training.demo_model warmup --model CKPT --data runs/shapes --out DIR
    python -m training.demo_model eval --model CKPT --data runs/shapes --split test \\
        --record runs/demo/model/demo.json
    python -m training.demo_model examples --out DIR
"""
