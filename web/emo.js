// EMO for ComfyUI: frontend extension.
// The Audio-Driven Sampler shows which clip it is on ("clip 3/12 · step 17/40") while it runs, so a long video's
// progress reads in clips, not only as the bar of all steps.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "EMOSampler";

function clipStatus(node, value, max) {
    const steps = node.widgets?.find((w) => w.name === "steps")?.value || 1;
    const clips = Math.max(1, Math.round(max / steps));
    const clip = Math.min(clips, Math.floor((value - 1) / steps) + 1);
    const step = value - (clip - 1) * steps;
    return value >= max ? `done: ${clips} clip${clips > 1 ? "s" : ""}` : `clip ${clip}/${clips} · step ${step}/${steps}`;
}

app.registerExtension({
    name: "emo.comfyui",
    setup() {
        api.addEventListener("progress", ({ detail }) => {
            const node = app.graph?.getNodeById(Number(detail?.node));
            if (!node || node.type !== SAMPLER) return;
            node.emoStatus = clipStatus(node, detail.value, detail.max);
            node.setDirtyCanvas(true, false);
        });
        api.addEventListener("execution_start", () => {
            for (const node of app.graph?.nodes ?? []) if (node.type === SAMPLER) node.emoStatus = undefined;
        });
    },
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== SAMPLER) return;
        const draw = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            draw?.apply(this, arguments);
            if (!this.emoStatus || this.flags?.collapsed) return;
            ctx.save();
            ctx.font = "12px sans-serif";
            ctx.fillStyle = "#8fd18f";
            ctx.textAlign = "right";
            ctx.fillText(this.emoStatus, this.size[0] - 10, -8);
            ctx.restore();
        };
    },
});
