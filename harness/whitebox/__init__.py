"""White-box image attacks: projected gradient descent on the pixels, through the defense.

Why a package of its own: an attack component (attacks/) may not know the defense, and a defense
must never know the attack, yet an adaptive attack needs both the model and the defended forward
pass. This package sits above both: the runner hands it the backend and (for `through=<defense>`)
the calibrated defense object (`handover`), it computes the defended loss with gradients
(`objectives`, `hooks`, `teacher`, `pixels`), runs PGD in 8-bit pixel units (`pgd`), and keeps
every optimisation resumable and cached on disk (`store`). Which defenses are differentiable, and
which are reported transfer-only, is stated once in `status`.
"""
