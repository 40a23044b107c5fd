# Rules of the nnU-Net student option (student.experiments[*].model: nnunet).
