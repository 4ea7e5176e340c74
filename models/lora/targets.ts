/**
 * Where a LoRA may apply in a model: every weight of a Linear or Conv2d layer of a built graph.
 *
 * The graphs declare their parameters by checkpoint key (STYLE §3), so a target is simply each
 * `<module>.weight` of rank 2 (Linear, [out, in]) or rank 4 (Conv2d, [out, in, kh, kw]), in the layout
 * checkpoints store it (`storedShape`: a linear weight the graph uses transposed is still [out, in]). Norm weights
 * are rank 1 and never targets. Embedding tables are rank 2 but are not layers a LoRA patches
 * (kohya, PEFT and LyCORIS all skip `nn.Embedding`), so they are left out by name.
 */
import type { ParamDecl } from '../onnx/builder.ts';
import type { LoraComponent, LoraTarget } from './types.ts';

const WEIGHT_SUFFIX = '.weight';
/** CLIP `token_embedding` / `position_embedding` (lookup tables, not layers). */
const EMBEDDING_TABLE = /(?:^|[._])embedding$/;

/** The LoRA targets of one component's graph parameters (`buildUnetGraph(…).params`, `buildClipTextGraph(…).params`). */
export function loraTargetsFromParams(component: LoraComponent, params: readonly Pick<ParamDecl, 'name' | 'storedShape'>[]): LoraTarget[] {
  const targets: LoraTarget[] = [];
  for (const p of params) {
    if (!p.name.endsWith(WEIGHT_SUFFIX)) continue;
    if (p.storedShape.length !== 2 && p.storedShape.length !== 4) continue;
    const module = p.name.slice(0, -WEIGHT_SUFFIX.length);
    if (EMBEDDING_TABLE.test(module)) continue;
    targets.push({ component, module, weightShape: [...p.storedShape] });
  }
  return targets;
}
