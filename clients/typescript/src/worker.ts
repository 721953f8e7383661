/** `Worker`: one of several workers training one session (synchronous rounds, bounded staleness, or plain
 * one-at-a-time steps). It sends each gradient with the step of the parameters it was computed from,
 * tracks that step and those parameters, and catches up when the session refused its gradient as late. */

import type { Session, StepResult } from "./client.js";
import { StepConflict } from "./errors.js";
import type { Tensor, Tensors } from "./tensors.js";

export interface WorkerStepOptions {
  /** Recorded in the history (a round records the mean of its workers' losses). */
  loss?: number;
  /** Synchronous rounds with reduce weighted_mean: this contribution's weight (e.g. its batch size). */
  weight?: number;
}

export class Worker {
  readonly session: Session;
  readonly id: string;
  /** The step of the parameters this worker holds: its gradients are computed there. */
  atStep: number;
  /** The parameters at `atStep`, once a step or a catch-up fetched them (null before). */
  params: Record<string, Tensor> | null = null;
  /** Gradients the session refused as too late (the worker then caught up). */
  dropped = 0;
  private readonly inRounds: boolean;

  constructor(session: Session, id: string) {
    this.session = session;
    this.id = id;
    this.atStep = session.info.step;
    this.inRounds = session.info.aggregation?.mode === "sync";
  }

  /** The step's result, or null when the gradient was refused as too late (409): `params` then holds the
   * session's current parameters, to compute the next gradient from. */
  async step(grads: Tensors, options: WorkerStepOptions = {}): Promise<StepResult | null> {
    let result: StepResult;
    try {
      result = await this.session.step(grads, {
        expectedStep: this.atStep,
        loss: options.loss,
        weight: options.weight,
        worker: this.inRounds ? this.id : undefined,
      });
    } catch (error) {
      if (!(error instanceof StepConflict)) throw error;
      this.dropped += 1;
      this.params = await this.session.params();
      if (error.currentStep >= 0) this.atStep = error.currentStep;
      return null;
    }
    this.atStep = result.step;
    if (Object.keys(result.params).length > 0) this.params = result.params;
    return result;
  }
}
