"""The modified Region Proposal Network of the Appendix (item 2): RPN1 and RPN2.

- Anchors: 22 per location (proposals/anchors.py) on conv5_3's grid (stride 16).
- Head: a 3x3 (384) and a 5x5 (128) convolution side by side, concatenated,
  ReLU, then 1x1 convolutions for objectness (A) and box deltas (4A).
- RPN1 predicts from conv5_3. RPN2 predicts from conv4_3 and conv5_3
  concatenated after L2 normalisation and scaling. conv4_3 (stride 8) is
  brought to conv5's stride by a 2x2 max pool of stride 2: the same operation
  as VGG16's own pool4 between conv4_3 and conv5_1, so both maps summarise the
  same cells and odd sizes round the way conv5 does. The normalisation is per
  location across channels (ParseNet; Sec. 5.2 finds it as good as the
  whole-blob one) with a learnable per-channel scale per layer (Sec. 3.1's
  "scale layer"), initialised to `RpnConfig.l2_scale`.

One `RegionProposalNetwork` holds one backbone and both heads, trained jointly
(the sum of both heads' losses): the paper trains two RPNs; sharing the
backbone halves the training cost and each head still sees only its own
input features. A proposal source is the network plus the head of its variant.

Boxes are float32 xyxy in continuous pixel coordinates (docs/CONTRACTS.md);
`generate_proposals` returns them in original-image coordinates.
"""
